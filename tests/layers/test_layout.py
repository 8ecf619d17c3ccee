"""Token layout: segments, scan orders, backward plans and Swin windows."""

import pytest
import torch

from linmu_cli.layers.layout import Segment, TokenLayout, find_segments, scan_permutation


def test_scan_orders_visit_the_grid_as_named():
    seg = Segment(0, t=2, h=2, w=3)
    assert scan_permutation(seg, "thw").tolist() == list(range(12))
    # column-major per frame: for each frame, walk w outer, h inner
    assert scan_permutation(seg, "twh").tolist()[:6] == [0, 3, 1, 4, 2, 5]
    # temporal-major: for each (h, w) both frames in turn
    assert scan_permutation(seg, "hwt").tolist()[:4] == [0, 6, 1, 7]
    for order in ("thw", "twh", "hwt", "wht"):
        assert sorted(scan_permutation(seg, order).tolist()) == list(range(12))


def test_find_segments_splits_adjacent_images_and_checks_grids():
    kind = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0]])
    valid = torch.ones_like(kind, dtype=torch.bool)
    segs = find_segments(kind, valid, {1: [(1, 2, 2), (1, 2, 2)], 2: [(1, 2, 2)]})
    assert segs == [[Segment(1, 1, 2, 2), Segment(5, 1, 2, 2), Segment(10, 1, 2, 2)]]
    with pytest.raises(ValueError, match="does not fit"):
        find_segments(kind, valid, {1: [(1, 3, 3)], 2: [(1, 2, 2)]})
    with pytest.raises(ValueError, match="no grid left"):
        find_segments(kind, valid, {1: [(1, 2, 2)]})


def _layout(segments, length=20, batch=1):
    layout = TokenLayout.text_only(batch, length, torch.device("cpu"))
    layout.segments = segments
    return layout


def test_backward_plan_reverses_each_segment_and_restarts():
    layout = _layout([[Segment(2, 1, 2, 2), Segment(8, 1, 1, 3)]], length=12)
    plan = layout.backward_plan("thw")
    assert plan.index[0].tolist() == [0, 1, 5, 4, 3, 2, 6, 7, 10, 9, 8, 11]
    assert plan.reset[0].tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    assert plan.next_index[0, 2].item() == 4  # query of step 2 (token 5) is shifted to the next step's token
    assert torch.equal(plan.index[0][plan.inverse[0]], torch.arange(12))


@pytest.mark.parametrize("shifted", [False, True])
def test_windows_cover_every_vision_token_once(shifted):
    seg = Segment(3, t=3, h=5, w=6)
    layout = _layout([[seg]], length=3 + seg.length + 2)
    plan = layout.window_plan([2, 2, 4], shifted)
    covered = plan.index[plan.valid].tolist()
    assert sorted(covered) == list(range(seg.start, seg.end))
    assert plan.index.shape[1] == 2 * 2 * 4
    # tokens sharing a window are within the window extent on every axis
    for row, ok in zip(plan.index, plan.valid, strict=True):
        offs = row[ok] - seg.start
        t, h, w = offs // 30, (offs // 6) % 5, offs % 6
        assert t.max() - t.min() < 2 and h.max() - h.min() < 2 and w.max() - w.min() < 4


def test_shift_changes_the_partition():
    seg = Segment(0, t=4, h=4, w=4)
    layout = _layout([[seg]], length=64)
    a = layout.window_plan([2, 2, 2], False)
    b = layout.window_plan([2, 2, 2], True)
    assert a.index.shape[0] == 8 and b.index.shape[0] == 27  # 2^3 full windows vs 3^3 with borders


def test_windows_of_segments_with_different_grids_share_one_padded_plan():
    layout = _layout([[Segment(0, 1, 2, 2), Segment(4, 4, 2, 2)]], length=20)
    plan = layout.window_plan([2, 2, 2], False)
    assert plan.index.shape[1] == 8
    assert sorted(plan.index[plan.valid].tolist()) == list(range(20))
    assert plan.valid.sum(1).tolist() == [4, 8, 8]
