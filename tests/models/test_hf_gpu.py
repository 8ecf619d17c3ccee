"""GPU: generate(cache_implementation="static") runs fast_decode's CUDA-graph step (issue 13).

Same tokens and logits as the LinMUCache path (float32, so the comparison is tight), the graph really captured,
and the state untouched by the capture's warm-up steps; the same with a bf16 SSM state. Run with `python3 -m pytest -s -m gpu tests/models/test_hf_gpu.py`.
"""

import pytest
import torch
from helpers import output_cache, prompt_inputs, video

from linmu_cli.config import MateConfig
from linmu_cli.models import convert_model
from linmu_cli.tiny import build_tiny_teacher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_generate_replays_a_cuda_graph_and_equals_the_cache_path(num_beams):
    teacher, processor = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher.cuda(), MateConfig(text_window=5, vision_window=[2, 1, 2]))
    inputs = prompt_inputs(
        processor, ["hi", "a much longer question about it"], videos=[video(1), video(2, 4)]
    )
    inputs = inputs.to("cuda")
    outs = []
    for impl in ("static", None):
        with torch.no_grad():
            outs.append(student.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=num_beams,
                                         cache_implementation=impl, return_dict_in_generate=True,
                                         output_scores=True))  # fmt: skip
    got, want = outs
    assert output_cache(got).static.graph is not None
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-3, rtol=1e-3)


def test_a_bf16_ssm_state_under_the_graph_equals_it_eager():
    """cache_config={"ssm_dtype": "bfloat16"}: mamba's step kernel stores the state in bf16 inside the captured
    graph exactly as the eager forward does (the same step on the same kind of cache)."""
    teacher, _ = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher.cuda(), MateConfig(text_window=5))
    ids = torch.randint(0, 900, (2, 11), device="cuda")
    outs = []
    for impl in ("static", None):
        with torch.no_grad():
            outs.append(student.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                         cache_implementation=impl, cache_config={"ssm_dtype": "bfloat16"},
                                         return_dict_in_generate=True, output_scores=True))  # fmt: skip
    got, want = outs
    cache = output_cache(got)
    assert cache.static.graph is not None and {layer.ssm.dtype for layer in cache.layers} == {torch.bfloat16}
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-3, rtol=1e-3)


def test_static_generate_on_cuda_runs_linmu_loop_with_transformers_result():
    """On CUDA, generate(cache_implementation="static") runs decode_loop.static_decode (the stop flag read every
    few tokens, no host sync per token) by itself, and gives transformers' own loop's tokens, early stops included."""
    from transformers import GenerationMixin

    from linmu_cli.models import decode_loop

    teacher, processor = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher.cuda(), MateConfig(text_window=5, vision_window=[2, 1, 2]))
    inputs = prompt_inputs(processor, ["hi", "a much longer question about it", "and a third one"]).to("cuda")
    args = dict(do_sample=True, top_k=4, max_new_tokens=40, cache_implementation="static")
    torch.manual_seed(5)
    with torch.no_grad():
        free = student.generate(**inputs, **args)
    assert decode_loop.last_decode_loop() == "linmu_static"
    new = free[:, inputs["input_ids"].shape[1] :]
    eos = [int(new[0, 2]), int(new[1, 20]), int(new[2, 25])]
    outs = []
    for loop in (GenerationMixin._sample, None):  # transformers' loop, then the automatic choice
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(
                student.generate(**inputs, **args, eos_token_id=eos, pad_token_id=0, custom_generate=loop)
            )
    assert decode_loop.last_decode_loop() == "linmu_static"
    assert torch.equal(outs[1], outs[0])
