"""The lmms-eval model `linmu`: any checkpoint linmu loads (LinMU student or its teacher), images and videos.

    lmms-eval --model linmu --model_args pretrained=out/,max_num_frames=64 --tasks videomme
    linmu eval out/ --tasks videomme --teacher teacher/

Model args: `pretrained` (checkpoint directory, hub id in the HF cache, or a linmu alias such as
`tiny-qwen2-vl`), `device` (auto | cpu | cuda | cuda:N), `dtype` (auto | bfloat16 | float16 | float32),
`batch_size`, `max_num_frames` (default 64), `fps` (sample this many frames per second, capped by
`max_num_frames`; default: uniform over the whole video), `max_pixels` / `min_pixels` (per image / frame;
default: the checkpoint's processor), `max_new_tokens` (cap on the task's), `system_prompt`,
`attn_implementation` (the teacher's vision / text attention; LinMU decoders use M-MATE regardless),
`interleave_visuals` (each visual at its `<image k>` / `<image>` placeholder instead of all first: `arrange`),
`seed`. Values are typed and range-checked (`manifest.coerce_model_args`).

Videos are decoded with decord into arrays (never through decord's process-global bridge) and handed to the
processor with their sampled frame rate. Batches are left padded. A LinMU model decodes with its constant-size
`LinMUCache` (the size is recorded in `stats`); a teacher uses transformers' default KV cache.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from linmu_cli.data.chat import chat_prompt
from linmu_cli.evaluation.manifest import MODEL_ARGS, coerce_model_args, parse_arg_string
from linmu_cli.loading import load_model
from linmu_cli.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, read_video

_PLACEHOLDER = re.compile(r"<image (\d+)>|<image>")  # MMMU's numbered images; LongVideoBench _i's frames

__all__ = ["MODEL_ARGS", "LinMU"]


def _optional(value, cast):
    return None if value in (None, "", "none", "None") else cast(value)


def _blame(exc: Exception, task: str | None, doc_id: int | None) -> Exception:
    """Mark which task (and doc) a request failed on, so `linmu eval` can name it; the exception is unchanged
    otherwise (plain lmms-eval prints it as before)."""
    if task is not None and not hasattr(exc, "linmu_task"):
        exc.linmu_task = task  # type: ignore[attr-defined]
        exc.linmu_doc = doc_id  # type: ignore[attr-defined]
        exc.add_note(
            f"linmu: while answering task {task}" + (f", doc {doc_id}" if doc_id is not None else "")
        )
    return exc


def _keep_tuple(result: tuple[float, bool]):
    """lmms-eval 0.7.3 turns every model output that is not a str or a GenerationResult into its str()
    (`api/instance.py: unwrap_generation_output`), which breaks `multiple_choice` (it unpacks (loss, greedy)
    pairs). A GenerationResult's `text` is passed through untouched, so the pair travels inside one."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # older lmms-eval: plain tuples are kept
        return result
    return GenerationResult(text=result)


class LinMU(lmms):
    """lmms-eval "simple" model over a LinMU checkpoint or its teacher (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_num_frames: int = 64,
        fps: float | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        attn_implementation: str | None = None,
        seed: int = 0,
        interleave_visuals: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"linmu: unknown model_args {', '.join(sorted(kwargs))}; accepted: {', '.join(MODEL_ARGS)}"
            )
        typed = coerce_model_args(
            {
                "batch_size": batch_size,
                "max_batch_size": max_batch_size,
                "max_num_frames": max_num_frames,
                "fps": fps,
                "max_pixels": max_pixels,
                "min_pixels": min_pixels,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "interleave_visuals": interleave_visuals,
            }  # fmt: skip
        )
        batch_size, max_num_frames, fps, seed = (
            typed[k] for k in ("batch_size", "max_num_frames", "fps", "seed")
        )
        max_pixels, min_pixels, max_new_tokens = (
            typed["max_pixels"],
            typed["min_pixels"],
            typed["max_new_tokens"],
        )
        self.interleave_visuals = bool(typed["interleave_visuals"])
        if str(batch_size).startswith("auto"):
            batch_size = 1  # no automatic batch-size search: pass batch_size=N
        self.batch_size_per_gpu = int(batch_size)
        self.max_num_frames = int(max_num_frames)
        self.fps = _optional(fps, float)
        self.max_new_tokens = _optional(max_new_tokens, int)
        self.system_prompt = _optional(system_prompt, str)
        if self.batch_size_per_gpu < 1 or self.max_num_frames < 2:
            raise ValueError("linmu: batch_size must be >= 1 and max_num_frames >= 2")

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Data parallel under `accelerate launch` / `torchrun`: one replica per process (its local GPU, or
            # the CPU with gloo). lmms-eval shards the requests by rank and gathers them with `accelerator`.
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
        elif device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from linmu_cli.errors import LinmuError
        from linmu_cli.sources import check_device

        try:
            self._device = check_device(device)
        except LinmuError as exc:
            raise ValueError(f"linmu: {exc}") from None
        self.pretrained = str(pretrained)
        loaded = load_model(self.pretrained, dtype=str(dtype), device=self._device,
                            attn_implementation=attn_implementation, seed=int(seed), require_processor=True)  # fmt: skip
        self.model, self.processor = loaded.model, loaded.processor
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.processor.tokenizer.padding_side = "left"
        self._set_pixels(_optional(min_pixels, int), _optional(max_pixels, int))
        self.is_linmu = loaded.is_linmu
        self.progress = progress
        self._recent_videos: OrderedDict = OrderedDict()
        self.stats: dict[str, Any] = {
            "model_class": type(self.model).__name__,
            "linmu": self.is_linmu,
            "cache": "LinMUCache (constant size)"
            if self.is_linmu
            else "transformers default (grows with length)",
            "cache_bytes_max": 0,
            "cache_bytes_last": 0,
            "generate_requests": 0,
            "loglikelihood_requests": 0,
            "generate_seconds": 0.0,
            "loglikelihood_seconds": 0.0,
            "max_prompt_tokens": 0,
        }

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LinMU:
        """lmms-eval's constructor path. Its CLI always adds its own `--batch_size` (default 1) to the model args,
        which `batch_size=N` inside --model_args would collide with (`got multiple values for keyword argument
        'batch_size'`); a value given in --model_args wins over the CLI's."""
        from linmu_cli.errors import LinmuError

        try:
            args = parse_arg_string(arg_string or "")
        except LinmuError as exc:  # lmms-eval's own errors for bad model args are ValueErrors
            raise ValueError(f"linmu: {exc}") from None
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # lmms-eval reads these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _set_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Per-image / per-frame pixel budget on both the image and the video processor."""
        if min_pixels is None and max_pixels is None:
            return
        for proc in (
            getattr(self.processor, "image_processor", None),
            getattr(self.processor, "video_processor", None),
        ):
            if proc is None:
                continue
            size = dict(proc.size) if getattr(proc, "size", None) is not None else {}
            size = {k: v for k, v in size.items() if v is not None}
            if min_pixels is not None:
                size["shortest_edge"] = min_pixels
            if max_pixels is not None:
                size["longest_edge"] = max_pixels
            proc.size = {"shortest_edge": size.get("shortest_edge"), "longest_edge": size.get("longest_edge")}

    def _frame_budget(self) -> int | None:
        """The video processor's per-frame pixel cap (decoding scales larger frames down to it)."""
        size = getattr(getattr(self.processor, "video_processor", None), "size", None)
        edge = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        return int(edge) if edge else None

    # ---- inputs -------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for v in visuals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return flat

    def _media(self, visual) -> tuple[str, Any, dict | None]:
        """('image', PIL) or ('video', frames, metadata) for one visual of a doc."""
        if isinstance(visual, Image.Image):
            return "image", visual.convert("RGB"), None
        if isinstance(visual, dict) and "path" in visual:  # datasets' Video / Image dicts
            visual = visual["path"]
        if isinstance(visual, (str, Path)):
            suffix = Path(str(visual)).suffix.lower()
            if suffix in VIDEO_EXTENSIONS:
                key = (str(visual), self.max_num_frames, self.fps)
                if key not in self._recent_videos:  # multiple-choice requests repeat a doc's video per choice
                    clip = read_video(visual, self.max_num_frames, self.fps, self._frame_budget())
                    meta = {"total_num_frames": len(clip.frames), "fps": clip.fps}
                    self._recent_videos[key] = ("video", clip.frames, meta)
                    while len(self._recent_videos) > 4:
                        self._recent_videos.popitem(last=False)
                return self._recent_videos[key]
            if suffix in IMAGE_EXTENSIONS:
                with Image.open(visual) as img:
                    return "image", img.convert("RGB"), None
            raise ValueError(f"linmu: cannot tell whether {visual} is an image or a video")
        if isinstance(visual, np.ndarray) and visual.ndim == 4:  # (T, H, W, 3) frames
            return "video", visual.astype(np.uint8), {"total_num_frames": len(visual), "fps": 1.0}
        if isinstance(visual, np.ndarray) and visual.ndim == 3:
            return "image", Image.fromarray(visual.astype(np.uint8)).convert("RGB"), None
        raise ValueError(
            f"linmu: unsupported visual of type {type(visual).__name__} (audio is not supported)"
        )

    def arrange(self, context: str, visuals: list) -> tuple[list[dict], list]:
        """(chat content with a {"type": "visual"} slot per visual, the visuals in the order of their slots).

        Default: every visual first, then the text (`<image>` tokens dropped). With `interleave_visuals=true`
        (lmms-eval's qwen2_vl semantics) each `<image k>` placeholder (MMMU, 1-based) becomes the k-th visual and
        each bare `<image>` (LongVideoBench `_i`: frames between subtitles) the next one, in place; text between
        them stays where it was; a placeholder without a visual is dropped, as in lmms-eval. A context without
        placeholders keeps the default layout."""
        if not (self.interleave_visuals and visuals and _PLACEHOLDER.search(context)):
            text = context.replace("<image>", "").strip() if visuals else context
            return [{"type": "visual"} for _ in visuals] + [{"type": "text", "text": text}], list(visuals)
        parts: list[dict] = []
        ordered: list = []
        pos = following = 0
        for match in _PLACEHOLDER.finditer(context):
            if context[pos : match.start()]:
                parts.append({"type": "text", "text": context[pos : match.start()]})
            if match.group(1) is not None:
                index = int(match.group(1)) - 1
            else:
                index, following = following, following + 1
            if 0 <= index < len(visuals):
                parts.append({"type": "visual"})
                ordered.append(visuals[index])
            pos = match.end()
        if context[pos:]:
            parts.append({"type": "text", "text": context[pos:]})
        return parts, ordered

    def _request(self, context: str, visuals: list, images: list, videos: list, metadata: list) -> str:
        """One request's chat prompt; its decoded visuals are appended to the batch lists in prompt order."""
        content, ordered = self.arrange(context, visuals)
        kinds = iter(self._collect_media(ordered, images, videos, metadata))
        return self._prompt([{"type": next(kinds)} if c["type"] == "visual" else c for c in content])

    def _prompt(self, content: list[dict]) -> str:
        return chat_prompt(self.processor, content, system=self.system_prompt)

    def _encode(self, prompts: list[str], images: list, videos: list, metadata: list) -> dict:
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            kwargs["video_metadata"] = metadata
            kwargs["do_sample_frames"] = False  # frames are already chosen
        inputs = self.processor(text=prompts, padding=True, return_tensors="pt", **kwargs)
        self.stats["max_prompt_tokens"] = max(
            self.stats["max_prompt_tokens"], int(inputs["input_ids"].shape[1])
        )
        return inputs.to(self._device)

    def _collect_media(self, visuals: list, images: list, videos: list, metadata: list) -> list[str]:
        """Decode a request's visuals, appending them to the batch lists; returns their kinds in order."""
        kinds = []
        for visual in visuals:
            kind, data, meta = self._media(visual)
            kinds.append(kind)
            if kind == "image":
                images.append(data)
            else:
                videos.append(data)
                metadata.append(meta)
        return kinds

    def _batch_inputs(self, contexts: list[str], visual_lists: list[list]) -> dict:
        prompts, images, videos, metadata = [], [], [], []
        for context, visuals in zip(contexts, visual_lists, strict=True):
            prompts.append(self._request(context, visuals, images, videos, metadata))
        return self._encode(prompts, images, videos, metadata)

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # ---- lmms-eval API ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from lmms_eval import utils
        from tqdm import tqdm

        if not requests:
            return []
        start = time.perf_counter()
        results: list[str] = []
        collator = utils.Collator([r.args for r in requests], lambda a: (-len(self.tokenizer.encode(a[0])), a[0]),
                                  grouping=True)  # fmt: skip
        bar = tqdm(
            total=len(requests), desc="linmu generate", disable=self.rank != 0 or self.progress is not None
        )
        done = 0
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            gen_kwargs = dict(all_gen_kwargs[0] or {})
            visual_lists = [
                self._visuals(f, d, t, s)
                for f, d, t, s in zip(doc_to_visual, doc_ids, tasks, splits, strict=True)
            ]
            try:
                inputs = self._batch_inputs(list(contexts), visual_lists)
                results.extend(self._generate(inputs, gen_kwargs))
            except Exception as exc:
                _blame(exc, tasks[0], doc_ids[0])
                raise
            done += len(chunk)
            bar.update(len(chunk))
            self._report("generate", done, len(requests))
        bar.close()
        self.stats["generate_requests"] += len(requests)
        self.stats["generate_seconds"] += time.perf_counter() - start
        return collator.get_original(results)

    def _generate(self, inputs: dict, gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or 128)
        if self.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                   "num_beams": int(gen_kwargs.get("num_beams") or 1)}  # fmt: skip
        if do_sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        cache = self.model.new_cache() if self.is_linmu else None
        if cache is not None:  # what generate() would build itself; created here to record its size
            from linmu_cli.models.modeling_linmu import _cache_arg

            options[_cache_arg(self.model.family.model_class)] = cache
        with torch.inference_mode():
            out = self.model.generate(**inputs, **options)
        if cache is not None:
            self.stats["cache_bytes_last"] = int(cache.nbytes())
            self.stats["cache_bytes_max"] = max(self.stats["cache_bytes_max"], self.stats["cache_bytes_last"])
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        answers = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text.strip())
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list:
        """(loss, is_greedy) per request, lmms-eval's convention: loss is the continuation's mean negative
        log-likelihood per token after the chat-formatted context (lower is better: `multiple_choice` takes the
        argmin, lmms-eval issue #370), is_greedy whether greedy decoding would write it. The continuation is
        scored as the start of the assistant's answer."""
        from lmms_eval import utils
        from tqdm import tqdm

        if not requests:
            return []
        start = time.perf_counter()
        items = []
        for r in requests:
            args = r.args
            if len(args) == 2:  # unconditional (acc_mutual_info): no visuals
                context, continuation, visuals = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else str(target(doc))
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
            items.append((context, continuation, visuals, task if len(args) != 2 else None))
        # Longest context first; the choices of one doc share it and stay adjacent (stable sort), so its video
        # is decoded once.
        collator = utils.Collator(items, lambda a: (-len(self.tokenizer.encode(a[0])), a[0]))
        results: list[tuple[float, bool]] = []
        bar = tqdm(
            total=len(items), desc="linmu loglikelihood", disable=self.rank != 0 or self.progress is not None
        )
        done = 0
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            try:
                results.extend(self._loglikelihood_batch(chunk))
            except Exception as exc:
                _blame(exc, chunk[0][3], None)
                raise
            done += len(chunk)
            bar.update(len(chunk))
            self._report("loglikelihood", done, len(items))
        bar.close()
        self.stats["loglikelihood_requests"] += len(requests)
        self.stats["loglikelihood_seconds"] += time.perf_counter() - start
        return [_keep_tuple(r) for r in collator.get_original(results)]

    def _loglikelihood_batch(self, chunk) -> list[tuple[float, bool]]:
        """Chunk items: (context, continuation, visuals[, task])."""
        prompts, images, videos, metadata, n_cont = [], [], [], [], []
        for context, continuation, visuals, *_ in chunk:
            prompt = self._request(context, visuals, images, videos, metadata)
            # Tokens the continuation adds to the prompt (visual placeholders expand identically in both).
            n = len(self.tokenizer(prompt + continuation)["input_ids"]) - len(
                self.tokenizer(prompt)["input_ids"]
            )
            if n < 1:
                raise ValueError(f"linmu: empty continuation {continuation!r}")
            n_cont.append(n)
            prompts.append(prompt + continuation)
        inputs = self._encode(prompts, images, videos, metadata)
        keep = max(n_cont) + 1
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j + 1
        ids = inputs["input_ids"][:, -keep + 1 :]
        out = []
        for b, n in enumerate(n_cont):
            lp, target = logprobs[b, -n:], ids[b, -n:]
            loss = -lp.gather(-1, target[:, None]).mean().item()
            greedy = bool((lp.argmax(-1) == target).all().item())
            out.append((loss, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("linmu: multi-round generation is not supported")
