"""`linmu bench`: time to first token, decode throughput and memory of a teacher VLM and its LinMU conversion.

Both models run the same synthetic video in one process, alternately, after a warm-up. The video has the real
processor's token layout (frames/2 x H/28 x W/28 LM tokens between vision_start / vision_end, chat-like text
around it) with random pixels: speed depends on shapes, not values, so `--arch` builds the published
architecture with random weights and no checkpoint is needed (docs/design.md §8-9 for the H200 context).

Per frame count it reports, for the teacher and for LinMU:

- TTFT = vision tower + LM prefill (to the first token's logits) + the first decode step, timed with CUDA
  events (perf_counter on CPU), median over `repeats` runs, with its split;
- the LinMU floor: the same LinMU model with its scans and window attention skipped (layers/floor.py), and
  LinMU TTFT as a multiple of it;
- decode throughput (tokens/s) at batch 1 (cache from the real prefill), at an equal batch for both (16) and at
  the largest batch that fits (doubling search until out of memory; at least the equal batch on CPU), the larger
  batches on caches filled with random values of the right shapes (decode cost does not depend on them; the
  output says so per entry);
- peak memory of prefill and of decoding, cache bytes per sequence; "OOM" where something does not fit.

The headline teacher decodes as it is served (`linmu_cli.teacher_decode`: static KV cache, the fastest measured
q_len=1 decode attention, one CUDA graph per step); `teacher_hf` is transformers' forward with its DynamicCache
(what `generate()` does). LinMU runs `linmu_cli.fast_decode` over its LinMUCache, captured in a CUDA graph on
CUDA (what `generate(cache_implementation="static")` runs), and also, at batch 1, the same layer step on the same
cache through transformers' forward, eager (`batch_1_hf`, what `generate()` runs otherwise). Both
models run the same vision tower (`linmu_cli.vision`, unless `fast_vision=False`). Roofline fields compare each
TTFT with the device's measured matrix rate and each decode step with its measured copy bandwidth
(`measure_ceilings`). Schema `linmu-bench/2` (docs/benchmarks.md).

One file per step of a run:

- `inputs.py`   the synthetic video prompt;
- `models.py`   building the teacher and the LinMU student that shares its weights;
- `timing.py`   clock, peak memory, out-of-memory guard, memory check, device ceilings and analytic FLOPs;
- `decode.py`   the decode measurements (served teacher, transformers' path, LinMU's fixed-buffer step);
- `runner.py`   the run loop (`run_bench`): warm-up, TTFT repeats, decode plan, the result dict;
- `report.py`   terminal tables, the figure, the JSON writer and the notes it carries.
"""

from __future__ import annotations

from linmu_cli.bench.decode import (
    DecodeStart,
    Decoding,
    decode_start,
    random_kv_cache,
    search_batch,
    storage_bytes,
)
from linmu_cli.bench.inputs import DTYPES, VideoPrompt, synthetic_video
from linmu_cli.bench.models import (
    BuiltModels,
    build_models,
    cache_kw,
    next_positions,
    prefill_backend,
    teacher_from_student,
)
from linmu_cli.bench.report import SCHEMA, crossover, lookup, make_figure, save_plot, tables
from linmu_cli.bench.runner import (
    TTFTRun,
    measure_ttft,
    parse_batch,
    parse_frames,
    run_bench,
    summarize_ttft,
)
from linmu_cli.bench.timing import (
    Ceilings,
    Flops,
    MemoryEstimate,
    available_bytes,
    estimate_bytes,
    guarded,
    measure_ceilings,
    prefill_flops,
    vision_flops,
)

_prefill_backend = prefill_backend  # the name benchmarks/mate_layer_profile.py imports

__all__ = ["DTYPES", "SCHEMA", "BuiltModels", "Ceilings", "DecodeStart", "Decoding", "Flops", "MemoryEstimate",
           "TTFTRun", "VideoPrompt", "available_bytes", "build_models", "cache_kw", "crossover", "decode_start", "estimate_bytes",
           "guarded", "lookup", "make_figure", "measure_ceilings", "measure_ttft", "next_positions", "parse_batch",
           "parse_frames", "prefill_backend", "prefill_flops", "random_kv_cache", "run_bench", "save_plot",
           "search_batch", "storage_bytes", "summarize_ttft", "synthetic_video", "tables",
           "teacher_from_student", "vision_flops"]  # fmt: skip
