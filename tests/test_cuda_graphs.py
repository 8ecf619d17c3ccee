"""`linmu_cli.cuda_graphs.record_cuda_graph`, the one CUDA-graph recorder (served teacher, StaticDecoder, kernel
trials): the warm-up runs on a side stream the given number of times, the body is recorded once, and a replay
redoes exactly the body's work on the same buffers."""

import pytest
import torch

from linmu_cli.cuda_graphs import record_cuda_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_replay_redoes_the_recorded_body_on_the_same_buffers():
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    calls = []

    def warm() -> None:
        calls.append("warm")
        x.mul_(1.0)

    def body() -> torch.Tensor:
        x.add_(1.0)
        return x * 2

    graph, out = record_cuda_graph(body, warmup=warm, warmup_steps=3)
    assert calls == ["warm"] * 3
    torch.cuda.synchronize()
    start = x.clone()  # the recording itself ran no kernel
    for k in range(1, 4):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(x, start + k)
        torch.testing.assert_close(out, (start + k) * 2)  # the output buffer is rewritten in place


def test_without_a_warmup_the_body_warms_up():
    x = torch.zeros(4, device="cuda")
    graph, _ = record_cuda_graph(lambda: x.add_(1.0), warmup_steps=2)
    torch.cuda.synchronize()
    assert float(x[0]) == 2.0  # two eager warm-up calls, none during recording
    graph.replay()
    torch.cuda.synchronize()
    assert float(x[0]) == 3.0
