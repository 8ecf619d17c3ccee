"""Recording one CUDA graph: the warm-up on a side stream that capture requires, then the capture itself.

The served teacher's step (`teacher_decode`), LinMU's step (`fast_decode.StaticDecoder`) and the kernel trials
(`teacher_decode.graph_ms`) all record their graphs through `record_cuda_graph`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def record_cuda_graph(
    body: Callable[[], T], warmup: Callable[[], object] | None = None, warmup_steps: int = 2
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `warmup` (default `body`) `warmup_steps` times on a side stream, then record `body` once.

    The warm-up is there because torch requires one before capture, and it is where Triton compiles and cuBLAS
    picks its workspaces. Returns the graph and what the recorded `body` returned (its output tensors, which
    every replay overwrites in place).
    """
    warm = body if warmup is None else warmup
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_steps):
            warm()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


__all__ = ["record_cuda_graph"]
