"""cuda-triton kernels on operands that are strided or hold invalid indices.

Strides: every read-only operand may have any stride its contract allows; the kernels must read
it as laid out (a kernel that assumed unit stride read the gaps, which ``spread`` fills with bytes
that give far-out-of-range indices and large floats).

Invalid indices: at check levels "none" and "metadata" (the value checks that reject them run
only at "values") a kernel never reads or writes out of bounds and gives the defined result of
the contract (a skipped slot or pair, a zero block, an identity rotation, a zero row). The
kernels are called directly, so no check runs; each expected result is built exactly, from the
reference on the valid part of the input.

Runs on a GPU when there is one, else in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1).
"""

import math

import pytest
import torch

import apt_hal
from apt_hal import mxfp4, ops
from apt_hal.backends.cuda_triton import fp4_matmul, moe, paged, rotary
from apt_hal.conformance.spec import place, spread
from apt_hal.errors import ContractError

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAR = 10 ** 12  # an index far past any tensor here (int64)


def random_bits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape).to(DEV)


def ids(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEV)


def same_bytes(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def device_spread(t, dims=None):
    """:func:`spread` (built on the CPU), placed on the test device with its layout."""
    return place({"t": spread(t.cpu(), dims)}, torch.device(DEV))["t"]


# ---- strided operands -------------------------------------------------------------------------


@pytest.mark.parametrize("split_k", [1, 2])
def test_fp4_matmul_reads_a_strided_bias(split_k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(DEV)
    packed = torch.randint(0, 256, (6, 32), dtype=torch.uint8, generator=g).to(DEV)
    scales = torch.randint(124, 130, (6, 2), dtype=torch.uint8, generator=g).to(DEV)
    bias = torch.arange(6.0, device=DEV)
    cfg = fp4_matmul.TileConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1, swap_ab=False,
                                split_k=split_k)
    expected = fp4_matmul.matmul(x, packed, scales, bias, config=cfg)
    got = fp4_matmul.matmul(x, packed, scales, device_spread(bias), config=cfg)
    assert torch.equal(got, expected)
    assert torch.allclose(expected, ops.fp4_matmul.reference(x, packed, scales, bias), rtol=1e-5, atol=1e-5)


def test_paged_write_reads_strided_slots_and_values():
    cache = random_bits((5, 4, 2, 8), torch.float16, seed=1)
    values = random_bits((6, 2, 8), torch.float16, seed=2)
    slots = ids([3, -1, 17, 0, 9, 12])
    expected = cache.clone()
    ops.paged_write.reference(expected, values, slots)
    got = cache.clone()
    paged.paged_write_triton(got, device_spread(values, 1), device_spread(slots))
    assert same_bytes(got, expected)


@pytest.mark.parametrize("table_shape", [(5,), (2, 3)], ids=["1d", "2d"])
def test_paged_gather_reads_a_strided_table(table_shape):
    cache = random_bits((6, 4, 3), torch.bfloat16, seed=3)
    table = torch.randint(-1, 6, table_shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    got = paged.paged_gather_triton(cache, device_spread(table))
    assert same_bytes(got, ops.paged_gather.reference(cache, table))


def test_paged_copy_blocks_reads_id_columns_of_a_table():
    src = random_bits((5, 4, 3), torch.float32, seed=5)
    dst = random_bits((4, 4, 3), torch.float32, seed=6)
    table = ids([[4, 0], [0, 3], [2, 1]])  # (src, dst) pairs: the ids are its columns, stride 2
    expected = dst.clone()
    ops.paged_copy_blocks.reference(src, table[:, 0].contiguous(), expected, table[:, 1].contiguous())
    got = dst.clone()
    paged.paged_copy_blocks_triton(src, table[:, 0], got, table[:, 1])
    assert same_bytes(got, expected)


# ---- invalid indices: paged ---------------------------------------------------------------------


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_paged_write_skips_slots_past_the_pool(id_dtype):
    cache = random_bits((3, 4, 2), torch.uint8, seed=7)
    values = random_bits((5, 2), torch.uint8, seed=8)
    big = 2 ** 31 - 1 if id_dtype == torch.int32 else FAR
    slots = ids([2, 12, big, -5, 11], id_dtype)  # 12 slots: 12 and big are out of range
    expected = cache.clone()
    ops.paged_write.reference(expected, values, torch.where((slots >= 0) & (slots < 12), slots, -1))
    paged.paged_write_triton(cache, values, slots)
    assert same_bytes(cache, expected)


def test_paged_write_into_an_empty_pool_writes_nothing():
    cache = torch.empty((0, 4, 2), dtype=torch.float32, device=DEV)
    paged.paged_write_triton(cache, torch.ones(2, 2, device=DEV), ids([0, 5]))
    assert cache.shape == (0, 4, 2)


def test_paged_gather_gives_zero_blocks_for_ids_past_the_pool():
    cache = random_bits((4, 2, 3), torch.bfloat16, seed=9)
    table = ids([[1, 4, FAR], [-3, 3, 0]])
    expected = ops.paged_gather.reference(cache, torch.where(table < 4, table, -1))
    assert same_bytes(paged.paged_gather_triton(cache, table), expected)


def test_paged_gather_from_an_empty_pool_gives_zeros():
    cache = torch.empty((0, 4, 2), dtype=torch.float16, device=DEV)
    got = paged.paged_gather_triton(cache, ids([[0, 7], [-1, 1]]))
    assert got.shape == (2, 2, 4, 2) and not got.view(torch.int16).any()


def _copy_pairs_case():
    src = random_bits((5, 2, 3), torch.float32, seed=10)
    dst = random_bits((4, 2, 3), torch.float32, seed=11)
    src_ids, dst_ids = ids([0, 7, -1, 2, 3]), ids([1, 2, 3, FAR, 0])  # pairs 1, 2 and 3 are out of range
    expected = dst.clone()
    ops.paged_copy_blocks.reference(src, ids([0, 3]), expected, ids([1, 0]))
    return src, src_ids, dst, dst_ids, expected


def test_paged_copy_blocks_skips_pairs_out_of_range():
    src, src_ids, dst, dst_ids, expected = _copy_pairs_case()
    paged.paged_copy_blocks_triton(src, src_ids, dst, dst_ids)
    assert same_bytes(dst, expected)


def test_copy_to_the_host_skips_pairs_out_of_range():
    # The cross-device path (the host side's scatter), run here with both pools on this device.
    src, src_ids, dst, dst_ids, expected = _copy_pairs_case()
    host, host_ids = dst.cpu(), dst_ids.cpu()
    paged.copy_blocks_across_devices(src, src_ids, host, host_ids)
    assert same_bytes(host, expected.cpu())


# ---- invalid indices: rotary -------------------------------------------------------------------


def _rotary_case(pos_dtype):
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 3, 4, 32, generator=g).to(DEV)
    k = torch.randn(2, 3, 2, 32, generator=g).to(DEV)
    theta = torch.rand(5, 8, generator=g) * 6.3
    cache = torch.cat([theta.cos(), theta.sin()], dim=1).to(DEV)  # partial rotary: R = 16 of 32
    big = 2 ** 31 - 1 if pos_dtype == torch.int32 else FAR
    positions = ids([[0, 5, -1], [big, 4, 2]], pos_dtype)
    # The defined result: out-of-range positions rotate by the identity, i.e. by an extra cache row
    # (cos 1, sin 0) that the reference can index.
    identity = torch.cat([torch.ones(1, 8), torch.zeros(1, 8)], dim=1).to(DEV)
    valid = (positions >= 0) & (positions < 5)
    q_ref, k_ref = ops.rotary.reference(q, k, torch.where(valid, positions, 5).long(), torch.cat([cache, identity]))
    return q, k, positions, cache, q_ref, k_ref


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rotary_positions_out_of_range_rotate_by_the_identity(pos_dtype):
    q, k, positions, cache, q_ref, k_ref = _rotary_case(pos_dtype)
    q_out, k_out = rotary.rotary_triton(q, k, positions, cache)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(q_out[0, 1:], q[0, 1:]) and torch.equal(k_out[1, 0], k[1, 0])
    rotary.rotary_triton_(q, k, positions, cache)
    assert torch.equal(q, q_out) and torch.equal(k, k_out)


@pytest.mark.parametrize("bad", ["position", "k_dtype"])
def test_rotary_inplace_writes_nothing_when_a_check_fails(bad):
    q, k, positions, cache, _, _ = _rotary_case(torch.int64)
    if bad == "k_dtype":
        k = k.to(torch.float16)
    q0, k0 = q.clone(), k.clone()
    previous = apt_hal.set_checks("values")
    try:
        with apt_hal.use("cuda-triton", strict=True), pytest.raises(ContractError, match="'positions'|'k'"):
            ops.rotary_(q, k, positions, cache)
    finally:
        apt_hal.set_checks(previous)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# ---- invalid values: MoE ---------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_rows_without_defined_routing_get_zero_weights(scoring, renormalize):
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 8, generator=g)
    logits[1, 2] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[4, :6] = float("-inf")  # two finite logits for k = 3: the third choice has weight 0
    logits = logits.to(DEV)
    weights, topk = moe.route(logits, 3, scoring, renormalize)
    good = [0, 4, 5]
    w_ref, i_ref = ops.moe_route.reference(logits[good], 3, scoring, renormalize)
    torch.testing.assert_close(weights[good], w_ref, rtol=1e-5, atol=0)
    assert torch.equal(topk[good], i_ref)
    assert weights[4, 2] == 0
    assert torch.equal(weights[1:4], torch.zeros(3, 3, device=DEV))
    assert torch.equal(topk[1:4], torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_puts_ids_out_of_range_last(id_dtype):
    g = torch.Generator().manual_seed(14)
    topk = torch.randint(0, 4, (9, 2), generator=g)
    topk[1, 0], topk[4, 1], topk[7, 1] = -1, 4, 2 ** 31 - 1
    if id_dtype == torch.int64:
        topk[8, 0] = 2 ** 32 + 1  # would be expert 1 if narrowed to int32
    topk = topk.to(id_dtype).to(DEV)
    valid = (topk >= 0) & (topk < 4)
    # Dropless, the defined order is the reference's with a fifth expert for the invalid ids.
    order_ref, offsets_ref = ops.moe_permute.reference(torch.where(valid, topk, 4), 5, -1)
    order, offsets = moe.permute(topk, 4, -1)
    assert torch.equal(order, order_ref) and torch.equal(offsets, offsets_ref[:5])


def test_permute_with_capacity_puts_ids_out_of_range_after_the_dropped():
    topk = ids([[0, 5], [0, -1], [0, 1]], torch.int32)
    order, offsets = moe.permute(topk, 2, 1)
    # kept: a0 (expert 0), a5 (expert 1); dropped: a2, a4 (expert 0); out of range: a1, a3
    assert order.tolist() == [0, 5, 2, 4, 1, 3] and offsets.tolist() == [0, 1, 2]


EXPERT_TILES = {
    "mma": (dict(KIND="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), dict(KIND="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)),
    "tma": (dict(KIND="tma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), dict(KIND="tma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)),
    "gemv": (dict(KIND="gemv", BLOCK_M=2, BLOCK_N=8, BLOCK_K=64), dict(KIND="gemv", BLOCK_M=2, BLOCK_N=16, BLOCK_K=32)),
}


def _experts_case(kind):
    t, e, k, d, f = 3, 4, 2, 64, 32
    g = torch.Generator().manual_seed(15)
    x = torch.randn(t, d, generator=g).to(DEV)
    order, offsets = ops.moe_permute.reference(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]),
                                               e, -1)
    w_up = torch.randn(e, 2 * f, d, generator=g) / 8
    w_down = torch.randn(e, d, f, generator=g) / 8
    if kind == "gemv":  # the MXFP4 kernels
        (w_up, s_up), (w_down, s_down) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
        x = x.to(torch.bfloat16)
    else:
        s_up = s_down = None
        if kind == "tma":
            x, w_up, w_down = x.to(torch.bfloat16), w_up.to(torch.bfloat16), w_down.to(torch.bfloat16)
    b_up = torch.randn(e, 2 * f, generator=g).to(x.dtype)
    b_down = torch.randn(e, d, generator=g).to(x.dtype)
    weights = [w.to(DEV) if w is not None else None for w in (w_up, w_down, s_up, s_down, b_up, b_down)]
    return x, order.to(DEV), offsets.to(DEV), weights, k


@pytest.mark.parametrize("kind", EXPERT_TILES)
def test_experts_give_zero_rows_for_assignments_out_of_range(kind):
    x, order, offsets, (w_up, w_down, s_up, s_down, b_up, b_down), k = _experts_case(kind)
    expected = moe.experts(x, order, offsets, w_up, w_down, s_up, s_down, b_up, b_down, k, tiles=EXPERT_TILES[kind])
    bad = order.clone()
    bad[1], bad[4] = 10 ** 6, -7
    got = moe.experts(x, bad, offsets, w_up, w_down, s_up, s_down, b_up, b_down, k, tiles=EXPERT_TILES[kind])
    expected[1] = expected[4] = 0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", EXPERT_TILES)
def test_experts_read_malformed_offsets_as_clamped_running_maxima(kind):
    x, order, _, (w_up, w_down, s_up, s_down, b_up, b_down), k = _experts_case(kind)
    s = order.numel()
    malformed = ids([3, 100, 2, 7, -3])  # read as [0, 6, 6, 6, 6]: expert 0 owns every row
    got = moe.experts(x, order, malformed, w_up, w_down, s_up, s_down, b_up, b_down, k, tiles=EXPERT_TILES[kind])
    expected = moe.experts(x, order, ids([0, s, s, s, s]), w_up, w_down, s_up, s_down, b_up, b_down, k,
                           tiles=EXPERT_TILES[kind])
    assert torch.equal(got, expected)
    short = ids([0, 2, 1, 4, 3])  # read as [0, 2, 2, 4, 4]: rows 4.. are dropped (zero)
    got = moe.experts(x, order, short, w_up, w_down, s_up, s_down, b_up, b_down, k, tiles=EXPERT_TILES[kind])
    expected = moe.experts(x, order, ids([0, 2, 2, 4, 4]), w_up, w_down, s_up, s_down, b_up, b_down, k,
                           tiles=EXPERT_TILES[kind])
    assert torch.equal(got, expected) and not got[4:].any()


def test_combine_with_assignments_that_are_not_a_permutation():
    t, k, d = 5, 2, 16
    g = torch.Generator().manual_seed(16)
    y = torch.randn(t * k, d, generator=g).to(DEV)
    weights = torch.rand(t, k, generator=g).to(DEV)
    offsets = ids([0, 3, 6, 9])  # rows 9.. are dropped
    order = ids([0, 0, 3, 999, -5, 2, 2, 1, 9, 9], torch.int32)
    # Each assignment takes the last row naming it; 4..8 have none; row 9 (assignment 9) is dropped.
    row_of = {0: 1, 3: 2, 2: 6, 1: 7, 9: 9}
    expected = torch.zeros(t, d, device=DEV)
    for tok in range(t):
        for j in range(k):
            row = row_of.get(tok * k + j, -1)
            if 0 <= row < 9:
                expected[tok] += weights[tok, j] * y[row]
    got = moe.combine(y, order, offsets, weights)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_pairs_of_a_cross_device_copy_keep_each_id_on_its_pools_device():
    # Seen on an H100: every cross-device copy failed ("found at least two devices") because the
    # source mask was moved to the destination's device and then applied to the source ids. Meta
    # tensors stand for the other device here, so the check runs without a GPU.
    from apt_hal.backends.cuda_triton.paged import _drop_invalid_pairs

    src_ids, dst_ids = torch.tensor([0, 5, 1, -1]), torch.tensor([2, 0, 9, 1], device="meta")
    src, dst = _drop_invalid_pairs(src_ids, 4, dst_ids, 3)
    assert src.device.type == "cpu" and dst.device.type == "meta"
    assert src.tolist() == [0, 0, 1, 0]  # out-of-range sources read block 0; their pairs are skipped
