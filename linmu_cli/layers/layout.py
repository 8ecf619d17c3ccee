"""Token layout of one forward chunk: where the visual segments are and how each layer walks them.

Built once per model forward (docs/design.md §2) and handed to every M-MATE block as its `linmu_layout` keyword
(the one way it reaches the layers; a block called without one raises): the gather indices of the
Rotary Major-Scan orders, the segment-confined backward scan and the 3D Swin windows are all computed here,
lazily and memoized, so a layer only does tensor gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    """One image or video inside a row: `start` position and (t, h, w) grid in merged-token units."""

    start: int
    t: int
    h: int
    w: int

    @property
    def length(self) -> int:
        return self.t * self.h * self.w

    @property
    def end(self) -> int:
        return self.start + self.length


def scan_permutation(seg: Segment, order: str) -> torch.Tensor:
    """Offsets (within the segment) of its tokens in scan order `order`, outermost axis first.

    Tokens are stored raster (t, h, w); order "hwt" visits, for each (h, w), all frames in turn.
    """
    grid = torch.arange(seg.length).view(seg.t, seg.h, seg.w)
    return grid.permute(*["thw".index(a) for a in order]).reshape(-1)


@dataclass
class WindowPlan:
    """Vision tokens grouped into padded 3D windows: `index` (n_windows, size) into the flattened (B*L)
    chunk, `valid` marks real slots."""

    index: torch.Tensor
    valid: torch.Tensor
    # every vision token sits in exactly one slot: out_flat[dst] = windows_flat[src] scatters the results back
    # with integer indices built on the host (a boolean-mask scatter would sync with the GPU in every layer)
    src: torch.Tensor
    dst: torch.Tensor
    full: bool = False  # every window complete (known on the host): no mask, so SDPA may take a fused kernel


@dataclass
class BackwardPlan:
    """Backward (anti-causal) scan inside segments, as a forward scan over a gathered order.

    `index[b, r]` is the chunk position scanned at step r (each segment reversed, in this layer's scan order);
    `reset[b, r]` restarts the state (first step of a segment and every text position);
    `next_index[b, r]` is index[b, r + 1] (or r itself at the end) so that the strictly-future output
    y'_t = S'_{t+1} C_t is the inclusive scan of the query shifted by one step.
    """

    index: torch.Tensor
    reset: torch.Tensor
    next_index: torch.Tensor
    inverse: torch.Tensor


@dataclass
class ScanGather:
    """One scan order as flat (B*L,) row gathers, built on the host once per forward (docs/design.md §3).

    `index[b*L + r]` is the flat token-order position scanned at step r of row b; `inverse` maps back. They
    are applied with `ops.gather.permute_rows` on (B*L, width) views: no index arithmetic on the GPU per
    layer, and each one's backward is the other's gather.
    """

    index: torch.Tensor
    inverse: torch.Tensor


@dataclass
class BackwardGather:
    """The segment-confined, strictly-future backward scan of one scan order, packed: one row per visual
    segment (`rows` x `steps`, segments shorter than the longest padded at their end), so the scan needs no
    resets, no `cu_seqlens` (fla reads those back to the host) and skips every text token.

    Packed step (j, r) scans flat token `index[j*steps + r]` (x, B, dt) with the query of `next_index` (the
    token scanned next); padding steps repeat a real token and only their own, discarded outputs see it.
    Token t reads its output from packed step `out_index[t]`, masked by `keep[t]` (False at text tokens and
    at each segment's last token in scan order, whose future is empty).
    """

    index: torch.Tensor
    next_index: torch.Tensor
    out_index: torch.Tensor
    keep: torch.Tensor  # (B, L, 1, 1) bool
    rows: int
    steps: int


@dataclass
class TokenLayout:
    """Segments and padding of one chunk of shape (batch, length)."""

    batch: int
    length: int
    valid: torch.Tensor  # (B, L) bool, False at padding
    segments: list[list[Segment]]
    device: torch.device
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def text_only(
        cls, batch: int, length: int, device: torch.device, valid: torch.Tensor | None = None
    ) -> TokenLayout:
        known_all_valid = valid is None
        if valid is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        layout = cls(
            batch, length, valid.to(device=device, dtype=torch.bool), [[] for _ in range(batch)], device
        )
        if known_all_valid:  # known on the host: `all_valid` then never reads the mask back from the GPU
            layout._cache["all_valid"] = True
        return layout

    @property
    def has_vision(self) -> bool:
        return any(self.segments)

    @property
    def all_valid(self) -> bool:
        key = "all_valid"
        if key not in self._cache:
            self._cache[key] = bool(self.valid.all())
        return self._cache[key]

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        """A host-built plan tensor on the layout's device without stalling the GPU queue (pinned, async)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _is_vision_host(self) -> torch.Tensor:
        if "is_vision_host" not in self._cache:
            mask = torch.zeros(self.batch, self.length, dtype=torch.bool)
            for b, segs in enumerate(self.segments):
                for s in segs:
                    mask[b, s.start : s.end] = True
            self._cache["is_vision_host"] = mask
        return self._cache["is_vision_host"]

    def is_vision(self) -> torch.Tensor:
        """(B, L) bool: True at image / video tokens."""
        if "is_vision" not in self._cache:
            self._cache["is_vision"] = self._put(self._is_vision_host())
        return self._cache["is_vision"]

    def text_blocks(self, block: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row, block) indices of the blocks of `block` positions that hold a text token of this chunk.

        Positions count from `offset` (cached tokens before the chunk); a blocked sliding-window attention
        needs only these blocks' queries when the rest of the chunk is vision. None without vision (all needed).
        """
        if not self.has_vision:
            return None
        key = ("text_blocks", block, offset)
        if key not in self._cache:
            n_blocks = -(-(offset + self.length) // block)
            text = torch.zeros(self.batch, n_blocks * block, dtype=torch.bool)
            text[:, offset : offset + self.length] = ~self._is_vision_host()
            rows, blocks = text.view(self.batch, n_blocks, block).any(-1).nonzero(as_tuple=True)
            self._cache[key] = (self._put(rows), self._put(blocks))
        return self._cache[key]

    def scan_index(self, order: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index, inverse) gathers that put each segment in scan order; None when nothing moves."""
        if order == "thw" or not self.has_vision:
            return None
        key = ("scan", order)
        if key not in self._cache:
            index, inverse = self._scan_index_host(order)
            self._cache[key] = (self._put(index), self._put(inverse))
        return self._cache[key]

    def _scan_index_host(self, order: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, inverse) on the host: row b's position r holds the token scanned at step r."""
        key = ("scan_host", order)
        if key not in self._cache:
            index = torch.arange(self.length).repeat(self.batch, 1)
            for b, segs in enumerate(self.segments):
                for s in segs:
                    index[b, s.start : s.end] = s.start + scan_permutation(s, order)
            self._cache[key] = (index, torch.argsort(index, dim=1))
        return self._cache[key]

    def backward_plan(self, order: str) -> BackwardPlan | None:
        """Gathers for the segment-confined backward scan in scan order `order`; None without vision."""
        if not self.has_vision:
            return None
        key = ("backward", order)
        if key not in self._cache:
            index = torch.arange(self.length).repeat(self.batch, 1)
            reset = torch.ones(self.batch, self.length, dtype=torch.bool)
            for b, segs in enumerate(self.segments):
                for s in segs:
                    index[b, s.start : s.end] = s.start + scan_permutation(s, order).flip(0)
                    reset[b, s.start + 1 : s.end] = False
            next_index = torch.cat([index[:, 1:], index[:, -1:]], dim=1)
            inverse = torch.argsort(index, dim=1)
            put = self._put
            self._cache[key] = BackwardPlan(put(index), put(reset), put(next_index), put(inverse))
        return self._cache[key]

    def _flat(self, index: torch.Tensor) -> torch.Tensor:
        return (index + torch.arange(self.batch)[:, None] * self.length).reshape(-1)

    def scan_gather(self, order: str) -> ScanGather | None:
        """Flat gathers into and out of scan order `order`, once per forward; None when nothing moves."""
        if order == "thw" or not self.has_vision:
            return None
        key = ("scan_gather", order)
        if key not in self._cache:
            index, inverse = self._scan_index_host(order)
            self._cache[key] = ScanGather(self._put(self._flat(index)), self._put(self._flat(inverse)))
        return self._cache[key]

    def backward_gather(self, order: str) -> BackwardGather | None:
        """The backward scan of `backward_plan(order)` as packed per-segment gathers, built on the host once
        per forward; None without vision. Same math: each segment reversed, restarted, strictly future."""
        if not self.has_vision:
            return None
        key = ("backward_gather", order)
        if key not in self._cache:
            segs = [(b, s) for b, row in enumerate(self.segments) for s in row]
            steps = max(s.length for _, s in segs)
            index = torch.empty(len(segs), steps, dtype=torch.long)
            out_index = torch.zeros(self.batch * self.length, dtype=torch.long)
            keep = torch.zeros(self.batch * self.length, dtype=torch.bool)
            for j, (b, s) in enumerate(segs):
                tokens = b * self.length + s.start + scan_permutation(s, order).flip(0)
                index[j, : s.length] = tokens
                index[j, s.length :] = tokens[-1]
                out_index[tokens[1:]] = j * steps + torch.arange(s.length - 1)
                keep[tokens[1:]] = True
            next_index = torch.cat([index[:, 1:], index[:, -1:]], dim=1)
            put = self._put
            self._cache[key] = BackwardGather(
                put(index.reshape(-1)), put(next_index.reshape(-1)), put(out_index),
                put(keep.view(self.batch, self.length, 1, 1)), len(segs), steps,
            )  # fmt: skip
        return self._cache[key]

    def window_plan(self, window: Sequence[int], shifted: bool) -> WindowPlan | None:
        """Padded 3D windows over every segment (Swin partition, shifted by half a window when asked)."""
        if not self.has_vision:
            return None
        key = ("windows", tuple(window), shifted)
        if key not in self._cache:
            indices, valids = [], []
            for b, segs in enumerate(self.segments):
                for s in segs:
                    idx, val = _segment_windows(s, window, shifted)
                    indices.append(idx + b * self.length)
                    valids.append(val)
            size = max(i.shape[1] for i in indices)  # windows clipped to small grids are narrower: pad
            index = torch.cat([F.pad(i, (0, size - i.shape[1])) for i in indices])
            valid = torch.cat([F.pad(v, (0, size - v.shape[1]), value=False) for v in valids])
            src = valid.reshape(-1).nonzero().squeeze(1)
            dst = index.reshape(-1)[src]
            put = self._put
            self._cache[key] = WindowPlan(put(index), put(valid), put(src), put(dst), bool(valid.all()))
        return self._cache[key]


def _segment_windows(seg: Segment, window: Sequence[int], shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of one segment: (n_windows, wt*wh*ww) flat positions and validity.

    Window sizes are clipped to the grid; a shift moves the partition by half a window (partial windows at
    the borders, no cyclic roll), so every token lands in exactly one window.
    """
    sizes = (seg.t, seg.h, seg.w)
    win = [min(w, n) for w, n in zip(window, sizes, strict=True)]
    shift = [w // 2 if shifted and n > w else 0 for w, n in zip(win, sizes, strict=True)]
    counts = [-(-(n + s) // w) for n, s, w in zip(sizes, shift, win, strict=True)]
    coords = torch.meshgrid(*[torch.arange(n) for n in sizes], indexing="ij")
    wid = [(c + s) // w for c, s, w in zip(coords, shift, win, strict=True)]
    local = [(c + s) % w for c, s, w in zip(coords, shift, win, strict=True)]
    window_id = (wid[0] * counts[1] + wid[1]) * counts[2] + wid[2]
    slot = (local[0] * win[1] + local[1]) * win[2] + local[2]
    n_windows, size = counts[0] * counts[1] * counts[2], win[0] * win[1] * win[2]
    index = torch.zeros(n_windows, size, dtype=torch.long)
    valid = torch.zeros(n_windows, size, dtype=torch.bool)
    flat = seg.start + torch.arange(seg.length)
    index[window_id.reshape(-1), slot.reshape(-1)] = flat
    valid[window_id.reshape(-1), slot.reshape(-1)] = True
    keep = valid.any(dim=1)  # shifted partitions can leave empty windows at the far border
    return index[keep], valid[keep]


def find_segments(
    vision_type: torch.Tensor,
    valid: torch.Tensor,
    grids: dict[int, list[tuple[int, int, int]]],
) -> list[list[Segment]]:
    """Split each row's runs of vision tokens into segments, consuming grids in order.

    `vision_type` (B, L): 0 text, 1 image, 2 video (the processor's mm_token_type_ids convention).
    `grids[kind]` lists (t, h, w) in merged units in the order the images / videos appear, row by row.
    Adjacent images of the same kind form one run; it is split by the grids' lengths.
    """
    iters = {kind: iter(g) for kind, g in grids.items()}
    kinds = (vision_type * valid.to(vision_type.dtype)).tolist()
    out: list[list[Segment]] = []
    for b, row in enumerate(kinds):
        segs: list[Segment] = []
        pos = 0
        while pos < len(row):
            kind = row[pos]
            if kind == 0:
                pos += 1
                continue
            end = pos
            while end < len(row) and row[end] == kind:
                end += 1
            while pos < end:
                grid = next(iters.get(kind, iter(())), None)
                if grid is None:
                    name = "image_grid_thw" if kind == 1 else "video_grid_thw"
                    raise ValueError(f"row {b}: vision tokens at {pos} have no grid left in {name}")
                seg = Segment(pos, *grid)
                if seg.end > end:
                    raise ValueError(
                        f"row {b}: grid {grid} ({seg.length} tokens) does not fit the run of {end - pos} "
                        f"vision tokens at {pos}; check image_grid_thw / video_grid_thw against input_ids"
                    )
                segs.append(seg)
                pos = seg.end
        out.append(segs)
    return out
