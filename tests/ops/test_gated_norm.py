"""The gated norm's row chunking: every call's element offsets fit in int32 (the kernels' `row * stride`)."""

import torch

from linmu_cli.ops.gated_norm import int32_row_chunks

INT32_MAX = 2**31 - 1


def _max_offset(chunk_rows: int, *matrices: torch.Tensor) -> int:
    return max((chunk_rows - 1) * m.stride(0) + m.shape[1] - 1 for m in matrices)


def test_a_gate_slice_of_a_2048_frame_prompt_is_split_so_offsets_fit_int32():
    rows = 262_181  # 2048 frames at 448x448
    gate = torch.empty(rows, 12_864, device="meta")[
        :, 512 : 512 + 3584
    ]  # strided column slice of the GEMM output
    y = torch.empty(rows, 3584, device="meta")
    chunks = int32_row_chunks(y, gate)
    assert len(chunks) == 2 and chunks[0][0] == 0 and chunks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:], strict=True))  # no row twice or missing
    assert all(_max_offset(j - i, y, gate) <= INT32_MAX for i, j in chunks)
    assert _max_offset(rows, gate) > INT32_MAX  # one call would overflow


def test_short_inputs_are_one_call():
    y = torch.empty(65_573, 3584, device="meta")
    gate = torch.empty(65_573, 12_864, device="meta")[:, :3584]
    assert int32_row_chunks(y, gate) == [(0, 65_573)]
    assert int32_row_chunks(y, None) == [(0, 65_573)]
    assert int32_row_chunks(torch.empty(0, 8, device="meta"), None) == [(0, 0)]
