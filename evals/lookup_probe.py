"""Which side of teacher 2's colour look-up fails? For `grid_color` (what colour is the square at the <cell>?):

- where each wrong reply's square lies relative to the asked cell (rows, columns of the 3x3 grid), read from the
  pixels: session 14's teacher put every error in the same row, the other side column ("left" read as "right");
- how well a linear probe tells, from the look-up head's query at the answer position, which side column was asked
  (left / right) and which side row (top / bottom); and, from its keys on the image tokens, which side of the image
  a token lies on; and the same two questions from the answer position's hidden state at every layer (where the
  question's cell is gathered, or is not). Probes are logistic regressions on 70% of the samples, scored on the
  other 30%.

    python evals/lookup_probe.py CHECKPOINT [--count 300] [--layer L] [--head H] [--json out.json]

Queries and keys are the layer's q_proj / k_proj outputs before the rotary embedding (the look-up reads image
tokens from one text position, and the width rotary frequencies turn by < 0.002 rad across a row at base 1e6).
CPU by default; ~2 s per sample for teacher 2 on two cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.data.chat import chat_prompt, question_content  # noqa: E402
from linmu_cli.evaluation.answers import normalize_answer  # noqa: E402
from linmu_cli.evaluation.greedy import greedy_answers  # noqa: E402
from linmu_cli.loading import load_model  # noqa: E402

sys.path.insert(0, str(ROOT / "evals"))
from confusion import palette_masks  # noqa: E402


def square_cells(image: np.ndarray) -> dict[str, int]:
    """{colour: 3x3 cell of its square} read from the pixels (`confusion.palette_masks`)."""
    edges = [image.shape[0] * i / 3 for i in (1, 2)]
    cells = {}
    for name, mask in palette_masks(image).items():
        ys, xs = np.nonzero(mask)
        if len(ys):
            cells[name] = 3 * int(np.searchsorted(edges, ys.mean())) + int(np.searchsorted(edges, xs.mean()))
    return cells


def asked_cell(question: str) -> int:
    return synthetic.POSITIONS.index(
        max((p for p in synthetic.POSITIONS if f"at the {p}?" in question), key=len)
    )


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: float = 0.7, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression (standardized features, small L2) from x (n, d) to y (n,) bool."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order].float(), y[order].float()
    n = int(len(y) * train)
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ w + b, y[:n]) + 1e-3 * (w**2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n:] @ w + b > 0).float() == y[n:]).float().mean())


@torch.no_grad()
def lookup_probe(model, processor, count: int, layer: int, head: int, seed: int = 999) -> dict:
    attn = model.model.language_model.layers[layer].self_attn
    head_dim = attn.head_dim
    kv_head = head // (
        model.config.text_config.num_attention_heads // model.config.text_config.num_key_value_heads
    )
    kept: dict[str, torch.Tensor] = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: kept.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: kept.__setitem__("k", o))]  # fmt: skip
    samples = [synthetic.generate("grid_color", i, seed=seed) for i in range(count)]
    replies = [normalize_answer(r) for r in greedy_answers(model, processor, samples, batch_size=20)]
    queries, asked, keys, key_cols, key_rows, answers = [], [], [], [], [], []
    errors: collections.Counter = collections.Counter()
    wrong = 0
    try:
        for sample, reply in zip(samples, replies, strict=True):
            prompt = chat_prompt(processor, question_content("image", sample.question))
            inputs = processor(text=[prompt], images=[Image.fromarray(sample.media)], return_tensors="pt")
            hidden = model(**inputs.to(model.device), output_hidden_states=True).hidden_states
            answers.append(torch.stack([h[0, -1] for h in hidden]).float().cpu())  # (layers + 1, hidden)
            media = inputs["mm_token_type_ids"][0] > 0
            queries.append(kept["q"][0, -1, head * head_dim : (head + 1) * head_dim].cpu())
            asked.append(asked_cell(sample.question))
            k = kept["k"][0][media][:, kv_head * head_dim : (kv_head + 1) * head_dim].cpu()
            side = int(inputs["image_grid_thw"][0, 2]) // 2
            keys.append(k)
            key_cols.append(torch.arange(side).repeat(len(k) // side))
            key_rows.append(torch.arange(len(k) // side).repeat_interleave(side))
            if reply != normalize_answer(sample.answer):
                wrong += 1
                cells = square_cells(sample.media)
                a = asked[-1]
                errors[
                    f"({cells[reply] // 3 - a // 3},{cells[reply] % 3 - a % 3})"
                    if reply in cells
                    else "absent"
                ] += 1
    finally:
        for h in hooks:
            h.remove()
    q, cell = torch.stack(queries), torch.tensor(asked)
    k, cols, rows = torch.cat(keys), torch.cat(key_cols), torch.cat(key_rows)
    side = int(cols.max()) + 1
    lo, hi = side // 3, side - 1 - side // 3  # tokens of the outer thirds
    col_side, row_side = cell % 3 != 1, cell // 3 != 1
    key_col_side, key_row_side = (cols < lo) | (cols > hi), (rows < lo) | (rows > hi)
    residual = torch.stack(answers)  # (samples, layers + 1, hidden): the answer position's residual stream
    by_layer = range(residual.shape[1])
    return {
        "count": count, "seed": seed, "layer": layer, "head": head,
        "accuracy": 1 - wrong / count,
        "errors_by_offset": dict(errors.most_common()),  # "(row offset,column offset)" of the reply's square
        "query_right_vs_left": probe_accuracy(q[col_side], cell[col_side] % 3 == 2),
        "query_bottom_vs_top": probe_accuracy(q[row_side], cell[row_side] // 3 == 2),
        "keys_right_vs_left": probe_accuracy(k[key_col_side], cols[key_col_side] > hi),
        "keys_bottom_vs_top": probe_accuracy(k[key_row_side], rows[key_row_side] > hi),
        # the same two questions from the answer position's hidden state before layer 0, 1, ..., after the last
        "answer_right_vs_left_by_layer": [probe_accuracy(residual[col_side, i], cell[col_side] % 3 == 2) for i in by_layer],
        "answer_bottom_vs_top_by_layer": [probe_accuracy(residual[row_side, i], cell[row_side] // 3 == 2) for i in by_layer],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--count", type=int, default=300, help="grid_color samples (seed 999: not the held-out ones)"
    )
    p.add_argument(
        "--layer", type=int, help="decoder layer of the look-up (default: the middle one, as trained)"
    )
    p.add_argument("--head", type=int, default=0, help="query head (grid_color's look-up head is 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.checkpoint, require_processor=True, device=args.device)
    layer = args.layer if args.layer is not None else loaded.model.config.text_config.num_hidden_layers // 2
    res = lookup_probe(loaded.model.eval(), loaded.processor, args.count, layer, args.head)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
