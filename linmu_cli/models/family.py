"""What differs between source VLM families, behind one small adapter each.

A `Family` names a source family's transformers classes (config, model, bare model, processor: what
`linmu_cli.tiny` builds tiny teachers from) and the LinMU classes written out on them, and says where the
decoder layers live and how the visual segments of a batch are found (docs/design.md §2). Adding a family
(Qwen3-VL, LLaVA-OneVision, ...) is one new file beside `qwen2_vl.py` that writes its LinMU classes and calls
`register_family`, plus its Auto registration in `models/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from linmu_cli.errors import LinmuError
from linmu_cli.layers.layout import Segment, TokenLayout, find_segments


@dataclass(frozen=True)
class Family:
    """One source family: its transformers classes and the LinMU classes that extend them."""

    name: str  # source model_type, e.g. "qwen2_vl"
    config_class: type  # the source family's transformers config class
    model_class: type  # the source family's *ForConditionalGeneration class
    base_class: type  # its bare *Model class (no LM head): what AutoModel returns
    processor_class: type  # its processor (tokenizer + image / video processors)
    linmu_config_class: type  # LinMU<config_class>: the source config plus `mate` (own model_type)
    linmu_model_class: type  # LinMU<model_class>: every decoder self_attn an M-MATE block
    linmu_base_class: type  # LinMU<base_class>: the bare model with M-MATE blocks

    @property
    def linmu_model_type(self) -> str:
        """The model_type a converted checkpoint's config.json carries, e.g. "linmu_qwen2_vl"."""
        return self.linmu_config_class.model_type

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language decoder's layers, whose `self_attn` a LinMU model replaces (docs/design.md §1)."""
        return self.text_model(model).layers

    def text_model(self, model: nn.Module) -> nn.Module:
        """The language model of a teacher or LinMU model, with or without the LM head."""
        # the *ForConditionalGeneration class wraps the bare model in `.model`; the bare model has none
        return getattr(model, "model", model).language_model

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The decoder's config: what the M-MATE blocks are sized from."""
        return config.get_text_config(decoder=True)

    def build_layout(
        self,
        config: PretrainedConfig,
        length: int,
        batch: int,
        device: torch.device,
        input_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> TokenLayout:
        """Layout of the current chunk (the last `length` tokens) from what the processor / generate pass.

        Grids come from image_grid_thw / video_grid_thw, or, when generate() has already turned them into
        3D M-RoPE position ids (transformers >= 5.2x), from those positions. `input_ids` may be longer than the
        chunk (a whole conversation whose prefix is cached): segments are then found on the whole sequence and
        those of the chunk kept; a segment split between cache and chunk is an error. Vision token ids with
        neither grids nor 3D positions are text, as the teacher treats them (it embeds them as plain tokens).
        """
        valid = (
            attention_mask[:, -length:].bool()
            if attention_mask is not None and attention_mask.dim() == 2
            else None
        )
        layout = TokenLayout.text_only(batch, length, device, valid)
        if input_ids is not None:
            ids = input_ids
            kind = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
        elif mm_token_type_ids is not None:
            kind = mm_token_type_ids.long()
        else:
            return layout
        if not bool(kind[:, -length:].any()):
            return layout
        kind = kind.cpu()
        if image_grid_thw is not None or video_grid_thw is not None:
            merge = config.vision_config.spatial_merge_size
            grids = {
                kind_id: [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid.tolist()]
                for kind_id, grid in ((1, image_grid_thw), (2, video_grid_thw))
                if grid is not None
            }
            full = kind.shape[1]
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == full:
                valid_full = attention_mask.bool().cpu()
            else:
                valid_full = torch.ones(batch, full, dtype=torch.bool)
                valid_full[:, -length:] = layout.valid.cpu()
            if full > length and _grid_tokens(grids) == int(
                (kind[:, -length:] * valid_full[:, -length:]).bool().sum()
            ):
                # grids of the new part only (a later turn passes only its new images / videos)
                layout.segments = find_segments(kind[:, -length:], valid_full[:, -length:], grids)
            else:
                layout.segments = _chunk_segments(find_segments(kind, valid_full, grids), full - length)
        elif position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] in (3, 4):
            valid_cpu = layout.valid.cpu()
            kind = kind[:, -length:]
            grids = grids_from_positions(kind, valid_cpu, position_ids[-3:, :, -length:].cpu())
            layout.segments = find_segments(kind, valid_cpu, grids)
        return layout


def _grid_tokens(grids: dict[int, list[tuple[int, int, int]]]) -> int:
    return sum(t * h * w for grid in grids.values() for t, h, w in grid)


def _chunk_segments(segments: list[list[Segment]], offset: int) -> list[list[Segment]]:
    """The segments of a whole sequence that lie in its last part (from `offset` on), re-based to it."""
    out = []
    for b, row in enumerate(segments):
        kept = []
        for seg in row:
            if seg.start < offset < seg.end:
                raise ValueError(
                    f"row {b}: an image / video ({seg.start}..{seg.end}) is split between the cached prefix "
                    f"(first {offset} tokens) and the new input: a cache must end outside visual segments"
                )
            if seg.start >= offset:
                kept.append(Segment(seg.start - offset, seg.t, seg.h, seg.w))
        out.append(kept)
    return out


def grids_from_positions(kind: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> dict:
    """Recover (t, h, w) grids of every vision run from M-RoPE positions (3, B, L).

    Inside a segment h and w positions count rows / columns from a common start; a segment starts where the
    three positions are equal and above everything seen in the run (the next image's new base position).
    """
    grids: dict[int, list[tuple[int, int, int]]] = {1: [], 2: []}
    for b in range(kind.shape[0]):
        row = (kind[b] * valid[b]).tolist()
        pos = positions[:, b].tolist()
        i = 0
        while i < len(row):
            if row[i] == 0:
                i += 1
                continue
            end = i
            while end < len(row) and row[end] == row[i]:
                end += 1
            starts = [i]
            top = max(p[i] for p in pos)
            for j in range(i + 1, end):
                t, h, w = pos[0][j], pos[1][j], pos[2][j]
                if t == h == w and t > top:
                    starts.append(j)
                top = max(top, t, h, w)
            for s, e in zip(starts, [*starts[1:], end], strict=True):
                hh = max(pos[1][s:e]) - min(pos[1][s:e]) + 1
                ww = max(pos[2][s:e]) - min(pos[2][s:e]) + 1
                if (e - s) % (hh * ww):
                    raise ValueError(f"row {b}: vision positions at {s}..{e} do not form a (t, h, w) grid")
                grids[row[i]].append(((e - s) // (hh * ww), hh, ww))
            i = end
    return grids


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make a family known to `families()` / `family_for_model_type` (conversion, loading, tiny teachers)."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by source model_type."""
    return dict(_FAMILIES)


def family_for_model_type(model_type: str, architectures: list[str] | None = None) -> Family:
    """The adapter for a source checkpoint's model_type, or a LinmuError naming what was found."""
    for fam in _FAMILIES.values():
        if model_type in (fam.name, fam.linmu_model_type):
            return fam
    found = model_type or "unknown"
    if architectures:
        found += f" ({', '.join(architectures)})"
    raise LinmuError(
        f"unsupported model: found model_type {found}; linmu converts {', '.join(sorted(_FAMILIES))}"
    )
