"""Cases for paged_write, paged_gather and paged_copy_blocks. The ops move bytes, so pools and
values are random bytes (NaNs with payloads, infinities, -0 and subnormals included) and every
output is compared byte for byte, in every dtype."""

from __future__ import annotations

import torch

from apt_hal import ops
from apt_hal.conformance.spec import Case, OpSpec, randint, random_bytes, strided_variants, variants

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.float8_e4m3fn)
QUICK = (torch.uint8, torch.bfloat16)


def _pool(g, blocks: int, block_size: int, item, dtype, strided: bool) -> torch.Tensor:
    """A ``[blocks, block_size, *item]`` pool; ``strided``: layer 1 of a [blocks, 2, ...] allocation,
    as a per-layer view of a KV cache is (its first dimension is strided)."""
    if strided:
        return random_bytes(g, (blocks, 2, block_size, *item), dtype)[:, 1]
    return random_bytes(g, (blocks, block_size, *item), dtype)


def _ids(g, n: int, high: int, dtype=torch.int64, skip_every=0) -> torch.Tensor:
    """``n`` distinct ids in ``[0, high)`` in random order; every ``skip_every``-th is -1."""
    ids = torch.randperm(high, generator=g)[:n]
    if skip_every:
        ids[::skip_every] = -1
    return ids.to(dtype)


def _write(blocks, block_size, item, tokens, strided=False, id_dtype=torch.int64, skip_every=3):
    def make(g, dtype):
        return dict(cache=_pool(g, blocks, block_size, item, dtype, strided),
                    values=random_bytes(g, (tokens, *item), dtype),
                    slot_mapping=_ids(g, tokens, blocks * block_size, id_dtype, skip_every))

    return make


def _gather(blocks, block_size, item, table, strided=False, id_dtype=torch.int64):
    def make(g, dtype):
        ids = randint(g, -1, blocks, table, id_dtype)  # repeats allowed; -1 gives a zero block
        return dict(cache=_pool(g, blocks, block_size, item, dtype, strided), block_table=ids)

    return make


def _copy(src_blocks, dst_blocks, block_size, item, n, strided=False, id_dtype=torch.int64):
    def make(g, dtype):
        return dict(src=_pool(g, src_blocks, block_size, item, dtype, strided),
                    src_ids=_ids(g, n, src_blocks, id_dtype),
                    dst=_pool(g, dst_blocks, block_size, item, dtype, strided),
                    dst_ids=_ids(g, n, dst_blocks, id_dtype))

    return make


def _write_cases() -> list[Case]:
    op = "paged_write"
    cases = variants(op, DTYPES, "t7_bs4", _write(6, 4, (2, 8), 7), quick_dtypes="*")
    for name, make, feats in [("strided_pool", _write(6, 4, (2, 8), 9, strided=True), ("strided_pool",)),
                              ("odd_block_size", _write(5, 3, (3,), 5), ()),
                              ("int32_slots", _write(4, 4, (4,), 6, id_dtype=torch.int32), ()),
                              ("all_skipped", _write(4, 4, (4,), 6, skip_every=1), ()),
                              ("empty_t0", _write(4, 4, (4,), 0), ())]:
        cases += variants(op, DTYPES, name, make, quick_dtypes=QUICK, features=feats)
    cases += variants(op, DTYPES, "t300_bs16_kv8x128", _write(40, 16, (8, 128), 300, strided=True),
                      features=("strided_pool",))
    # Pools and values are dense past their first dimension; ids may have any stride.
    cases += strided_variants(Case(op, torch.bfloat16, "t7_bs4", _write(6, 4, (2, 8), 7)),
                              [("cache", 1), ("values", 1), ("slot_mapping", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            args = _write(4, 4, (4,), 5)(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.uint8, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    cases += [bad("duplicate_slot", "'slot_mapping'", value_check=True,
                  slot_mapping=lambda a: torch.tensor([3, 7, 3, -1, 0])),
              bad("slot_out_of_range", "'slot_mapping'", value_check=True,
                  slot_mapping=lambda a: torch.tensor([3, 16, 1, -1, 0])),
              bad("values_dtype", "'values'", values=lambda a: a["values"].to(torch.int32)),
              bad("values_item_shape", "'values'", values=lambda a: a["values"][:, :3]),
              bad("slot_mapping_dtype", "'slot_mapping'", slot_mapping=lambda a: a["slot_mapping"].float())]
    return cases


def _gather_cases() -> list[Case]:
    op = "paged_gather"
    cases = variants(op, DTYPES, "table_3x4", _gather(8, 4, (2, 8), (3, 4)), quick_dtypes="*")
    for name, make, feats in [("strided_pool", _gather(8, 4, (2, 8), (2, 5), strided=True), ("strided_pool",)),
                              ("batch_dims_2x2x3", _gather(6, 3, (5,), (2, 2, 3)), ()),
                              ("int32_table", _gather(6, 4, (4,), (3, 3), id_dtype=torch.int32), ()),
                              ("empty_table", _gather(6, 4, (4,), (0, 4)), ())]:
        cases += variants(op, DTYPES, name, make, quick_dtypes=QUICK, features=feats)
    cases += variants(op, DTYPES, "table_16x64_kv8x128", _gather(256, 16, (8, 128), (16, 64), strided=True),
                      features=("strided_pool",))
    cases += strided_variants(Case(op, torch.bfloat16, "table_3x4", _gather(8, 4, (2, 8), (3, 4))),
                              [("cache", 1), ("block_table", None), ("block_table", 1)])
    cases += strided_variants(Case(op, torch.bfloat16, "table_5", _gather(8, 4, (2, 8), (5,))), [("block_table", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            args = _gather(6, 4, (4,), (2, 3))(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.uint8, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    cases += [bad("block_out_of_range", "'block_table'", value_check=True,
                  block_table=lambda a: torch.tensor([[0, 6, -1]])),
              bad("table_dtype", "'block_table'", block_table=lambda a: a["block_table"].float())]
    return cases


def _copy_cases() -> list[Case]:
    op = "paged_copy_blocks"
    cases = variants(op, DTYPES, "n3", _copy(6, 5, 4, (2, 8), 3), quick_dtypes="*")
    for name, make, feats, host in [
        ("strided_pool", _copy(6, 5, 4, (2, 8), 4, strided=True), ("strided_pool",), ()),
        ("to_host", _copy(6, 5, 4, (2, 8), 3), ("cross_device",), ("dst", "dst_ids")),
        ("from_host", _copy(6, 5, 4, (2, 8), 3), ("cross_device",), ("src", "src_ids")),
        ("int32_ids", _copy(5, 5, 2, (3,), 4, id_dtype=torch.int32), (), ()),
        ("empty_n0", _copy(4, 4, 2, (3,), 0), (), ()),
    ]:
        cases += variants(op, DTYPES, name, make, quick_dtypes=QUICK, features=feats, host_args=host)
    cases += variants(op, DTYPES, "n64_kv8x128", _copy(128, 96, 16, (8, 128), 64))
    cases += variants(op, DTYPES, "n64_kv8x128_to_host", _copy(128, 96, 16, (8, 128), 64), features=("cross_device",),
                      host_args=("dst", "dst_ids"))
    cases += strided_variants(Case(op, torch.bfloat16, "n3", _copy(6, 5, 4, (2, 8), 3)),
                              [("src", 1), ("src_ids", None), ("dst", 1), ("dst_ids", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            args = _copy(5, 5, 2, (3,), 3)(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.uint8, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    cases += [bad("dtype_mismatch", "'dst'", dst=lambda a: a["dst"].to(torch.int16)),
              bad("block_shape_mismatch", "'dst'", dst=lambda a: a["dst"][:, :1]),
              bad("ids_count", "'dst_ids'", dst_ids=lambda a: a["dst_ids"][:2]),
              bad("duplicate_dst_ids", "'dst_ids'", value_check=True, dst_ids=lambda a: torch.tensor([1, 4, 1])),
              bad("src_id_out_of_range", "'src_ids'", value_check=True, src_ids=lambda a: torch.tensor([0, 5, 1]))]
    return cases


SPECS = [
    OpSpec("paged_write", ops.paged_write, ops.paged_write.reference, ("cache",), _write_cases, mutates=True,
           features=("strided_pool",)),
    OpSpec("paged_gather", ops.paged_gather, ops.paged_gather.reference, ("blocks",), _gather_cases,
           features=("strided_pool",)),
    OpSpec("paged_copy_blocks", ops.paged_copy_blocks, ops.paged_copy_blocks.reference, ("dst",), _copy_cases,
           mutates=True, features=("strided_pool", "cross_device")),
]
