"""LinMU checkpoints: a config subclass (own model_type) and a model subclass per source family.

`LinMU<Family>ForConditionalGeneration` is the family's transformers class with every decoder self-attention
swapped for an M-MATE block. It builds its token layout once per forward, creates its constant-size cache for
`generate()`, and is registered with the Auto classes so `AutoModelForImageTextToText.from_pretrained(out)`
returns it after `import linmu_cli`.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForImageTextToText

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.layout import TokenLayout, use_layout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.models.family import Family, families, family_for_model_type

LINMU_ATTENTION = "linmu_mate"


def _no_dense_attention(*args, **kwargs):
    raise RuntimeError("LinMU decoder layers never call a dense attention function")


# A registered name without a mask function: transformers then skips building any (L x L) causal mask.
AttentionInterface.register(LINMU_ATTENTION, _no_dense_attention)


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


class LinMUModelMixin:
    """Behaviour shared by every LinMU model class; `family` is set on each concrete class."""

    family: Family

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        mate = self.mate_config
        text_config = self.family.text_config(config)
        for i, layer in enumerate(self.family.decoder_layers(self)):
            ref = layer.self_attn.q_proj.weight
            layer.self_attn = MateAttention(text_config, mate, i).to(device=ref.device, dtype=ref.dtype)
        self._use_linmu_attention()

    @property
    def mate_config(self) -> MateConfig:
        return MateConfig.from_dict(self.config.mate)

    def _use_linmu_attention(self) -> None:
        self.family.text_model(self).config._attn_implementation = LINMU_ATTENTION

    def new_cache(self) -> LinMUCache:
        return LinMUCache(len(self.family.decoder_layers(self)))

    def forward(self, *args, **kwargs):
        kwargs = _bind_forward_args(self.family.model_class, self, args, kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        name = _cache_arg(self.family.model_class)
        if kwargs.get(name) is None and kwargs.get("use_cache") is not False and not self.training:
            kwargs[name] = self.new_cache()
        layout = self.token_layout(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # The layout travels both as a keyword (kept by gradient checkpointing for the recompute in backward)
        # and as a context variable (for code paths that drop unknown keywords).
        with use_layout(layout):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, linmu_layout=layout, **kwargs
            )

    def token_layout(self, input_ids=None, attention_mask=None, **kwargs) -> TokenLayout:
        """Visual segments and padding of a batch given as the processor returns it (docs/design.md §2)."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        cache = kwargs.get(_cache_arg(self.family.model_class))
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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        name = _cache_arg(self.family.model_class)
        if model_kwargs.get(name) is None and generation_config.use_cache is not False:
            model_kwargs[name] = self.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


@cache
def linmu_classes(family_name: str) -> tuple[type, type]:
    """(config class, model class) of the LinMU variant of a registered family, registered with Auto*."""
    family = families()[family_name]
    config_cls = type(
        f"LinMU{family.config_class.__name__}",
        (family.config_class,),
        {
            "model_type": family.linmu_model_type,
            "__doc__": f"{family.name} config plus an M-MATE `mate` dict.",
        },
    )

    def forward(self, *args, **kwargs):
        return LinMUModelMixin.forward(self, *args, **kwargs)

    forward.__signature__ = _forward_signature(family.model_class)
    forward.__doc__ = family.model_class.forward.__doc__
    model_cls = type(
        f"LinMU{family.model_class.__name__}",
        (LinMUModelMixin, family.model_class),
        {
            "config_class": config_cls,
            "family": family,
            "forward": forward,
            "__doc__": LinMUModelMixin.__doc__,
        },
    )
    AutoConfig.register(family.linmu_model_type, config_cls, exist_ok=True)
    AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def register_all() -> None:
    for name in families():
        linmu_classes(name)


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
    config_cls, model_cls = linmu_classes(family.name)
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
