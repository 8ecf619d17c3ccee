"""What every LinMU model class shares (`LinMUModelMixin`) and `convert_model()`, teacher -> student.

The classes themselves are written out in their family's file (`qwen2_vl.py`, `qwen2_5_vl.py`), as transformers'
modular files do: `LinMU<Source>Model(LinMUModelMixin, <Source>Model)` and
`LinMU<Source>ForConditionalGeneration(LinMUGenerationMixin, <Source>ForConditionalGeneration)` are the source
classes with every decoder self-attention swapped for an M-MATE block (docs/design.md §1). `LinMUModelMixin`
builds the token layout once per forward (docs/design.md §2), keeps the constant-size LinMUCache
(docs/design.md §3-4) and refuses what a recurrent state cannot do; `LinMUGenerationMixin` adds what generate()
needs. `models/__init__.py` registers the classes with the Auto classes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import AttentionInterface, GenerationMixin, PretrainedConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.models.family import Family, families, family_for_model_type

LINMU_ATTENTION = "linmu_mate"


def _no_dense_attention(*args, **kwargs):
    raise RuntimeError("LinMU decoder layers never call a dense attention function")


# A registered name without a mask function: transformers then skips building any (L x L) causal mask.
AttentionInterface.register(LINMU_ATTENTION, _no_dense_attention)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def same_signature_as(source: Callable[..., Any]) -> Callable[[_Method], _Method]:
    """Decorator: the method reports the signature of the transformers method it overrides.

    generate(), the Trainer and transformers' tests read which inputs a model takes from `forward`'s signature,
    and those parameters change between transformers releases (`cache` from 5.24 on, `past_key_values` before:
    docs/design.md §8). A LinMU override takes `*args, **kwargs` and points `__wrapped__` at the source method,
    as `functools.wraps` does, so `inspect.signature` shows the installed release's parameters.
    """
    return functools.wraps(source, assigned=(), updated=())


@cache
def _forward_signature(model_class: type) -> inspect.Signature:
    return inspect.signature(model_class.forward)


def _cache_arg(model_class: type) -> str:
    """The cache keyword of this transformers release: `cache` from 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in _forward_signature(model_class).parameters else "past_key_values"


def _bind_forward_args(model_class: type, model, args: tuple, kwargs: dict) -> dict:
    """The source class's forward arguments by name (so positional calls work and generate() validates)."""
    bound = _forward_signature(model_class).bind(model, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self", None)
    for param in _forward_signature(model_class).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
    return named


# generate(cache_implementation=...) values that mean what LinMU's own cache already is: a state whose size is fixed
# by the batch, never by the prompt (docs/design.md §3-4). Any other value (offloaded, quantized, sliding_window,
# ...) names a key / value cache layout that has no meaning for a recurrent state and is refused.
LINMU_CACHE_IMPLEMENTATIONS = ("static", "dynamic")


class LinMUModelMixin:
    """Behaviour shared by every LinMU model class: put first in the bases, before the transformers class it
    extends (`class LinMUQwen2VLModel(LinMUModelMixin, Qwen2VLModel)`), so `super()` here is that class."""

    # A recurrent state cannot be rolled back: transformers then refuses assisted / prompt-lookup decoding.
    _is_stateful = True

    @property
    def family(self) -> Family:
        """The source family's adapter (where the decoder layers are, how segments are found), by model_type."""
        return family_for_model_type(self.config.model_type)

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        """The source model, then every decoder self_attn replaced by a freshly initialised M-MATE block
        (`convert_model` initialises them from a teacher instead; `from_pretrained` loads them)."""
        super().__init__(config, *args, **kwargs)
        mate = self.mate_config
        config.mate = mate.to_dict()  # saved as is: without a runtime field an older checkpoint carried
        text_config = self.family.text_config(config)
        for i, layer in enumerate(self.family.decoder_layers(self)):
            ref = layer.self_attn.q_proj.weight
            layer.self_attn = MateAttention(text_config, mate, i).to(device=ref.device, dtype=ref.dtype)
        self._use_linmu_attention()
        self._drop_attention_tp_plan()

    @property
    def mate_config(self) -> MateConfig:
        """The M-MATE sizes, from the config's `mate` dict (what config.json saves; the runtime `ssd_backend`
        an older checkpoint may carry there is ignored, see MateConfig.from_saved)."""
        return MateConfig.from_saved(self.config.mate)

    def _use_linmu_attention(self) -> None:
        self.family.text_model(self).config._attn_implementation = LINMU_ATTENTION

    def set_attn_implementation(self, attn_implementation: str | dict, *args: Any, **kwargs: Any) -> Any:
        """The vision tower takes the requested implementation; the decoder keeps M-MATE, which needs no dense
        (L x L) mask (building one would cost O(L^2) memory for nothing)."""
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self._use_linmu_attention()
        return out

    def _drop_attention_tp_plan(self) -> None:
        """Remove the inherited tensor-parallel rules for `self_attn.{q,k,v,o}_proj`: M-MATE blocks have other
        modules and a per-head state, so they stay replicated; the MLPs and the LM head keep their sharding."""
        for module in self.modules():
            plan = module.__dict__.get("_tp_plan")
            if isinstance(plan, dict):
                module._tp_plan = {k: v for k, v in plan.items() if "self_attn" not in k}

    def new_cache(self, ssm_dtype: torch.dtype = torch.float32) -> LinMUCache:
        """An empty cache for this model: per layer the SSM state, conv tail and text-window ring (§3-4), allocated
        by the first forward. `ssm_dtype=torch.bfloat16` halves the SSM state (updated in float32, stored rounded)."""
        return LinMUCache(len(self.family.decoder_layers(self)), self.mate_config.text_window, ssm_dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The source forward on M-MATE blocks: a LinMUCache when none is given, the token layout built once,
        and errors for what a recurrent decoder cannot return or run (attention weights, packed rows)."""
        kwargs = _bind_forward_args(type(self), self, args, kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        if kwargs.get("output_attentions") or (
            kwargs.get("output_attentions") is None and getattr(self.config, "output_attentions", False)
        ):
            raise ValueError(
                "output_attentions=True: a LinMU decoder has no attention matrix (M-MATE mixes tokens with a "
                "state-space scan and windowed attention); call without output_attentions"
            )
        _refuse_packed_sequences(input_ids, attention_mask, kwargs)
        name = _cache_arg(type(self))
        cache = kwargs.get(name)
        if cache is None and kwargs.get("use_cache") is not False:
            # also in training: the HF Trainer calls forward with the config's use_cache=True, and the decoder
            # would otherwise build a DynamicCache that M-MATE blocks cannot use
            kwargs[name] = self.new_cache()
        elif cache is not None and not isinstance(cache, LinMUCache):
            raise TypeError(
                f"a LinMU model keeps a LinMUCache, not a {type(cache).__name__}: pass the cache a LinMU model "
                "returned, model.new_cache(), or none"
            )
        if isinstance(cache, LinMUCache) and (cache.static_requested or cache.static is not None):
            return self._fixed_buffer_forward(input_ids, attention_mask, kwargs, cache)
        return self._linmu_forward(input_ids, attention_mask, kwargs)

    def _linmu_forward(self, input_ids, attention_mask, kwargs: dict):
        layout = kwargs.pop("linmu_layout", None)
        if layout is None:
            self._check_vision_inputs(input_ids, kwargs)
            layout = self.token_layout(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # The layout reaches every M-MATE block as this keyword (transformers passes it down, and gradient
        # checkpointing keeps it for the recompute in backward); a block called without one raises.
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, linmu_layout=layout, **kwargs
        )

    def _fixed_buffer_forward(self, input_ids, attention_mask, kwargs: dict, cache: LinMUCache):
        """generate(cache_implementation="static"): prefill as usual, then step the cache with a `StaticDecoder`.

        The cache is the state either way (its buffers, allocated by the prefill, updated in place by every
        forward); the runner only replays the model's one-token step over them, as one CUDA graph on CUDA (eager
        elsewhere: the same step). A step that asks for more than logits (hidden states, labels) and a later
        multi-token call (next turn) are ordinary forwards on the same buffers; a new runner is made after the latter.
        """
        from linmu_cli.fast_decode import StaticDecoder

        step = cache.static is not None and input_ids is not None and input_ids.shape[1] == 1
        # by identity: `tensor in (None, False)` compares elementwise and raises for labels of several tokens
        wanted = [
            k
            for k in ("output_hidden_states", "labels", "inputs_embeds")
            if kwargs.get(k) is not None and kwargs.get(k) is not False
        ]
        if step and wanted:  # the runner returns logits only: this step runs eagerly, on the same buffers
            out = self._linmu_forward(input_ids, attention_mask, kwargs)
            cache.static.positions.add_(1)
            return out
        if step:
            positions = kwargs.get("position_ids")
            if positions is not None:  # what generate() computed: follow it exactly
                positions = positions[None].expand(3, -1, -1) if positions.dim() == 2 else positions[-3:]
                cache.static.positions.copy_(positions[:, :, -1:])
            logits = cache.static.feed(input_ids)[:, None]
            return cache.static_output(logits=logits, **{cache.static_output_field: cache})
        cache.drop_runner()
        seen: list[torch.Tensor] = []
        hook = self.family.text_model(self).rotary_emb.register_forward_hook(
            lambda module, args, out: seen.append(args[1])
        )
        try:
            out = self._linmu_forward(input_ids, attention_mask, kwargs)
        finally:
            hook.remove()
        if not hasattr(self, "lm_head"):
            return out
        positions = seen[-1]
        positions = positions[None].expand(3, -1, -1) if positions.dim() == 2 else positions[-3:]
        ref = out.logits
        runner = StaticDecoder.from_cache(
            self,
            cache,
            tokens=torch.zeros(ref.shape[0], 1, dtype=torch.long, device=ref.device),
            positions=positions[:, :, -1:] + 1,
        )
        if ref.device.type == "cuda":
            runner.capture(keep_state=True)
        cache.static = runner
        cache.static_output = type(out)
        cache.static_output_field = next(k for k, v in out.items() if v is cache)
        return out

    def _check_vision_inputs(self, input_ids, kwargs: dict) -> None:
        """The teacher's error (same words) when pixel inputs and vision tokens disagree; without it the layout
        would fail first, with a message about grids."""
        if input_ids is None:
            return
        merge = self.config.vision_config.spatial_merge_size**2
        for name, pixels, grid, token in (
            ("Image", "pixel_values", "image_grid_thw", self.config.image_token_id),
            ("Video", "pixel_values_videos", "video_grid_thw", self.config.video_token_id),
        ):
            if kwargs.get(pixels) is None or kwargs.get(grid) is None:
                continue
            tokens = int((input_ids == token).sum())
            features = int(kwargs[grid].prod(-1).sum()) // merge
            if tokens != features:
                raise ValueError(
                    f"{name} features and {name.lower()} tokens do not match, tokens: {tokens}, features: {features}"
                )

    def token_layout(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> TokenLayout:
        """Visual segments and padding of a batch given as the processor returns it (docs/design.md §2)."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        cache = kwargs.get(_cache_arg(type(self)))
        if ref.shape[1] == 1 and isinstance(cache, LinMUCache) and cache.get_seq_length() > 0:
            # One token continuing a cached sequence is a generated (text) token: visual segments arrive whole
            # in the prompt. Not looking for vision tokens keeps the decode step free of host syncs.
            two_d = attention_mask is not None and attention_mask.dim() == 2
            return TokenLayout.text_only(
                ref.shape[0], 1, ref.device, attention_mask[:, -1:] if two_d else None
            )
        names = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "position_ids")
        return self.family.build_layout(
            self.config,
            length=ref.shape[1],
            batch=ref.shape[0],
            device=ref.device,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{k: kwargs.get(k) for k in names},
        )


class LinMUGenerationMixin(LinMUModelMixin):
    """What generate() needs on top of LinMUModelMixin: the LM-head classes' bases start with it
    (`class LinMUQwen2VLForConditionalGeneration(LinMUGenerationMixin, Qwen2VLForConditionalGeneration, ...)`)."""

    @same_signature_as(GenerationMixin.generate)
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate(); with `cache_implementation="static"` on CUDA (one beam, no assistant) its
        decoding loop is `decode_loop.static_decode`, which reads the stop condition on the host every few tokens
        instead of every token (same output). `decode_loop.last_decode_loop()` says which loop ran."""
        from linmu_cli.models import decode_loop

        if kwargs.get("custom_generate") is None:
            user_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
            if not user_cache and decode_loop.uses_static_decode(self, kwargs):
                kwargs["custom_generate"] = decode_loop.static_decode
            else:
                decode_loop.set_last_decode_loop("transformers")
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """Feed only what the cache has not seen when generate() continues a returned cache.

        transformers trims the cached prefix of `input_ids` only when some cache layer is not linear; a LinMU
        cache is linear everywhere, so a multi-turn call (the whole conversation plus turn 1's cache) would
        feed the prefix into the state a second time. The layout of the new part is found on the whole
        sequence, so the grids of images / videos already in the cache are skipped.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if isinstance(cache, LinMUCache) else 0
        embeds = kwargs.get("inputs_embeds")
        full = (
            embeds.shape[1] if embeds is not None and kwargs.get("is_first_iteration") else input_ids.shape[1]
        )
        mask = kwargs.get("attention_mask")
        layout = None
        if (
            seen > 0
            and kwargs.get("is_first_iteration")
            and kwargs.get("next_sequence_length") is None
            and full > seen
            and (mask is None or mask.dim() != 2 or mask.shape[1] == full)
        ):
            new = full - seen
            if _generation_trims_by_length():
                kwargs["next_sequence_length"] = new
            # (before 5.2x generate() sliced input_ids by cache_position, from get_seq_length(): trimmed already)
            if embeds is None:
                layout = self.family.build_layout(
                    self.config,
                    length=new,
                    batch=input_ids.shape[0],
                    device=input_ids.device,
                    input_ids=input_ids,
                    attention_mask=mask,
                    mm_token_type_ids=kwargs.get("mm_token_type_ids"),
                    image_grid_thw=kwargs.get("image_grid_thw"),
                    video_grid_thw=kwargs.get("video_grid_thw"),
                )
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if layout is not None:
            inputs["linmu_layout"] = layout
        return inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a LinMUCache; `cache_implementation` "static" / "dynamic" mean that cache (it is
        fixed-size already, docs/design.md §3-4); other layouts are refused with the reason. `cache_config` may set
        the SSM state's dtype: generate(..., cache_config={"ssm_dtype": "bfloat16"})."""
        name = _cache_arg(type(self))
        impl = generation_config.cache_implementation
        if model_kwargs.get(name) is not None or generation_config.use_cache is False:
            user = model_kwargs.get(name)
            if user is not None and not isinstance(user, LinMUCache):
                raise TypeError(
                    f"a LinMU model decodes with a LinMUCache, not a {type(user).__name__}: pass the cache a "
                    "LinMU model returned, model.new_cache(), or none"
                )
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if impl is not None and impl not in LINMU_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={impl!r} describes a key / value cache; a LinMU model keeps a constant-size "
                f"recurrent state (LinMUCache): use cache_implementation in {LINMU_CACHE_IMPLEMENTATIONS} or "
                "leave it unset"
            )
        model_kwargs[name] = self.new_cache(**_linmu_cache_options(generation_config.cache_config))
        # the cache is fixed buffers either way; "static" steps it with linmu_cli.fast_decode.StaticDecoder (one CUDA
        # graph on CUDA). Not the default yet: the graph path has not run on a GPU since the one-state refactor.
        model_kwargs[name].static_requested = impl == "static"
        return None


_SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _linmu_cache_options(cache_config: dict | None) -> dict[str, torch.dtype]:
    """`new_cache` arguments from generate()'s `cache_config`: only `ssm_dtype` (a torch dtype or its name)."""
    options = dict(cache_config or {})
    dtype = options.pop("ssm_dtype", torch.float32)
    if options:
        raise ValueError(
            f"cache_config keys {sorted(options)}: a LinMUCache takes only 'ssm_dtype' (one of {sorted(_SSM_DTYPES)})"
        )
    dtype = _SSM_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _SSM_DTYPES.values():
        raise ValueError(f"cache_config ssm_dtype={dtype!r}: use one of {sorted(_SSM_DTYPES)}")
    return {"ssm_dtype": dtype}


@cache
def _generation_trims_by_length() -> bool:
    """Whether this transformers release's prepare_inputs_for_generation slices by `next_sequence_length`."""
    return (
        "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    )


def _refuse_packed_sequences(input_ids, attention_mask, kwargs: dict) -> None:
    """Refuse padding-free packing (several sequences in one row, position ids that restart).

    The SSD state, the conv tail and the text window would run across the boundary between two packed
    sequences and mix them silently (docs/design.md §3-4); until the layers restart their states at
    boundaries, packed rows are an error that says what to do instead.
    """
    packed = any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"))
    positions = kwargs.get("position_ids")
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if not packed and positions is not None and ref is not None and ref.shape[1] > 1:
        text = positions if positions.dim() == 2 else positions[0]  # 3D / 4D: temporal or text row
        text = text[..., -ref.shape[1] :]
        if text.dim() == 2 and text.shape[-1] > 1:
            steps = text[:, 1:] < text[:, :-1]
            if attention_mask is not None and attention_mask.dim() == 2:
                valid = attention_mask[:, -ref.shape[1] :].bool()
                steps &= valid[:, 1:] & valid[:, :-1]
            packed = bool(steps.any())
    if packed:
        raise ValueError(
            "padding-free packing (several sequences in one row: position ids that restart, or cu_seq_lens / "
            "seq_idx) is not supported by LinMU: its recurrent state would run from one sequence into the next. "
            "Pad the batch instead (e.g. DataCollatorWithPadding rather than DataCollatorWithFlattening)"
        )


def linmu_classes(family_name: str, base: bool = False) -> tuple[type, type]:
    """(config class, model class) of the LinMU variant of a registered family (e.g. "qwen2_vl").

    `base=True` gives the bare model (no LM head), what `AutoModel.from_pretrained(out)` returns. The classes are
    written out in the family's file and registered with the Auto classes by `linmu_cli.models`.
    """
    family = families()[family_name]
    return family.linmu_config_class, family.linmu_base_class if base else family.linmu_model_class


def _attention_prefixes(model: nn.Module, family: Family) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer.self_attn)] + "." for layer in family.decoder_layers(model)]


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner._buffers[attr] = tensor


def convert_model(teacher: nn.Module, mate: MateConfig, seed: int = 0) -> nn.Module:
    """A LinMU student that shares every non-attention tensor with `teacher` (no copy) and whose M-MATE
    blocks are initialized from the teacher's attention layers. The teacher is left unchanged."""
    family = family_for_model_type(teacher.config.model_type, getattr(teacher.config, "architectures", None))
    config_cls, model_cls = family.linmu_config_class, family.linmu_model_class
    data = teacher.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    config = config_cls(**data, mate=mate.validate().to_dict())
    with torch.device("meta"):
        student = model_cls(config)
    skip = _attention_prefixes(teacher, family)
    for name, tensor in [
        *teacher.named_parameters(remove_duplicate=False),
        *teacher.named_buffers(remove_duplicate=False),
    ]:
        if not any(name.startswith(p) for p in skip):
            _set_tensor(student, name, tensor)
    torch.manual_seed(seed)
    text_config = family.text_config(config)
    for i, (s_layer, t_layer) in enumerate(
        zip(family.decoder_layers(student), family.decoder_layers(teacher), strict=True)
    ):
        s_layer.self_attn = MateAttention.from_attention(t_layer.self_attn, text_config, mate, i)
    leftover = [n for n, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"conversion left tensors uninitialized: {leftover[:5]}")
    student.generation_config = teacher.generation_config
    student._use_linmu_attention()
    return student.eval() if not teacher.training else student
