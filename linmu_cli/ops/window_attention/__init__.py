"""Local-Swin's attentions (docs/design.md §4): 3D windows of vision tokens, the causal text window, and one
decode token over its ring. `batched.py` runs them as batched SDPA calls (no L x L masks; the decode token on
CUDA as one masked split-KV Triton kernel of `ops/decode_attention`); `naive.py` is the dense masked-softmax
reference they are tested against (tests/ops)."""

from linmu_cli.ops.window_attention.batched import (
    decode_attention,
    last_decode_backend,
    sliding_block,
    sliding_window_attention,
    window_attention,
)
from linmu_cli.ops.window_attention.naive import (
    masked_attention_naive,
    sliding_window_attention_naive,
    window_attention_naive,
)

__all__ = [
    "decode_attention",
    "last_decode_backend",
    "masked_attention_naive",
    "sliding_block",
    "sliding_window_attention",
    "sliding_window_attention_naive",
    "window_attention",
    "window_attention_naive",
]
