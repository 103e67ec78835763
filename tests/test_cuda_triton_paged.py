"""cuda-triton paged_write / paged_gather / paged_copy_blocks against the contract's reference.

These ops move bytes, so every comparison is exact, byte for byte, on pools filled with random bit
patterns (NaN payloads in float dtypes included). Runs on a GPU when there is one, else in
Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1).

The references are called with int64 ids: with int32 ids holding -1, the contract's value check
compares against -(2**62), which wraps in int32 and rejects valid input.
"""

import math

import pytest
import torch

import apt_hal
from apt_hal import ops, registry
from apt_hal.backends.cuda_triton import paged as triton_paged

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PIN = torch.cuda.is_available()  # host pools of the store are pinned; pinning needs a CUDA build
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int64, torch.float8_e4m3fn]
# (blocks in the pool, tokens or table entries): odd counts, not multiples of the block size
SIZES = [(6, 13)] + ([(1000, 3001)] if DEV == "cuda" else [])
BLOCK = 4  # slots per block


def random_bits(shape, dtype, seed, device=DEV, pin=False):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)
    return t.pin_memory() if pin else t.to(device)


def as_bytes(t):
    return t.contiguous().view(torch.uint8).cpu()


def assert_same_bytes(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(as_bytes(a), as_bytes(b))


def index(values, dtype, device=DEV):
    return torch.as_tensor(values).to(dtype).to(device)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("item", [(2, 8), (3,), ()], ids=["2x8", "3", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_matches_reference(dtype, item, size):
    n_blocks, n_tokens = size
    alloc = random_bits((n_blocks, 3, BLOCK, *item), dtype, seed=1)
    cache = alloc[:, 1]  # a per-layer view: dimension 0 strided
    values = random_bits((n_tokens, 2, *item), dtype, seed=2)[:, 0]  # strided tokens
    if not item:  # checks.inner_contiguous(from_dim=1) wrongly checks dim 0 of 1-D tensors (reported)
        values = values.contiguous()
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(n_blocks * BLOCK, generator=g)[:n_tokens]
    slots[::5] = -1  # padding tokens are skipped
    slots[1] = -7
    expected = alloc.clone()
    ops.paged_write.reference(expected[:, 1], values, slots.to(DEV))
    slot_dtype = torch.int32 if len(item) % 2 else torch.int64
    with apt_hal.use("cuda-triton", strict=True):
        assert ops.paged_write(cache, values, index(slots, slot_dtype)) is None
    assert_same_bytes(alloc, expected)  # the other layers are untouched too


@pytest.mark.parametrize("table_shape", [(13,), (2, 5), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_matches_reference(dtype, table_shape):
    n_blocks = 9
    cache = random_bits((n_blocks, 2, BLOCK, 2, 8), dtype, seed=4)[:, 1]
    g = torch.Generator().manual_seed(5)
    table = torch.randint(-1, n_blocks, table_shape, generator=g)  # -1: an unused slot, repeats allowed
    table.view(-1)[0] = -1
    expected = ops.paged_gather.reference(cache, table.to(DEV))
    with apt_hal.use("cuda-triton", strict=True):
        out = ops.paged_gather(cache, index(table, torch.int32 if len(table_shape) % 2 else torch.int64))
    assert out.shape == (*table_shape, BLOCK, 2, 8) and out.is_contiguous()
    assert_same_bytes(out, expected)
    assert not as_bytes(out.reshape(-1, BLOCK, 2, 8)[0]).any()  # -1 -> a zero block


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_blocks_on_one_device(dtype, size):
    n_blocks, n = size
    n = min(n, n_blocks - 1)
    src_alloc = random_bits((n_blocks, 2, BLOCK, 3, 8), dtype, seed=6)
    dst_alloc = random_bits((n_blocks + 1, 3, BLOCK, 3, 8), dtype, seed=7)
    src_before = src_alloc.clone()
    g = torch.Generator().manual_seed(8)
    src_ids = torch.randint(0, n_blocks, (n,), generator=g)  # repeated sources are fine
    dst_ids = torch.randperm(n_blocks + 1, generator=g)[:n]
    expected = dst_alloc.clone()
    ops.paged_copy_blocks.reference(src_alloc[:, 1], src_ids.to(DEV), expected[:, 0], dst_ids.to(DEV))
    with apt_hal.use("cuda-triton", strict=True):
        ops.paged_copy_blocks(src_alloc[:, 1], index(src_ids, torch.int32), dst_alloc[:, 0],
                              index(dst_ids, torch.int64))
    assert_same_bytes(dst_alloc, expected)
    assert_same_bytes(src_alloc, src_before)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("ids", ["scattered", "run"])
@pytest.mark.parametrize("direction", ["to_host", "from_host"])
def test_copy_blocks_between_host_and_device(direction, ids, id_dtype):
    """The tier moves. On a GPU: device pool <-> pinned host pool through the op (a contiguous run
    of host blocks is its own staging buffer; scattered host blocks are read by the GPU itself, or,
    to the host, staged: gather, one copy, scatter). The cross-device path is also called
    directly, so that on a CPU-only machine (where both pools are host memory and the op takes its
    one-kernel path) it is checked too."""
    dtype, n_blocks, n = torch.bfloat16, 11, 6
    device_pool = random_bits((n_blocks, BLOCK, 2, 8), dtype, seed=9)
    host_pool = random_bits((n_blocks + 2, BLOCK, 2, 8), dtype, seed=10, device="cpu", pin=PIN)
    src, dst = (device_pool, host_pool) if direction == "to_host" else (host_pool, device_pool)
    g = torch.Generator().manual_seed(11)
    src_ids = torch.randperm(src.shape[0], generator=g)[:n]
    dst_ids = torch.randperm(dst.shape[0], generator=g)[:n]
    if ids == "run":  # the host pool's blocks form one contiguous run: no gather/scatter on the CPU
        host_ids = torch.arange(3, 3 + n)
        src_ids, dst_ids = (src_ids, host_ids) if direction == "to_host" else (host_ids, dst_ids)
    src_ids, dst_ids = src_ids.to(id_dtype).to(src.device), dst_ids.to(id_dtype).to(dst.device)
    expected = dst.cpu().clone()
    ops.paged_copy_blocks.reference(src.cpu(), src_ids.cpu(), expected, dst_ids.cpu())
    dst_before = dst.clone()
    with apt_hal.use("cuda-triton", strict=True):
        ops.paged_copy_blocks(src, src_ids, dst, dst_ids)
    # No synchronisation: a copy to the host has landed when the call returns, and reading a
    # device pool (.cpu()) is in stream order.
    assert_same_bytes(dst, expected)
    dst.copy_(dst_before)
    triton_paged.copy_blocks_across_devices(src, src_ids, dst, dst_ids)
    assert_same_bytes(dst, expected)


@pytest.mark.parametrize("programs", [1, 3])
def test_gpu_reads_scattered_pinned_host_blocks(programs):
    """The scattered host -> GPU path: the kernel on the GPU reads pinned host blocks itself, a grid
    of a few programs looping over them (tiles smaller than a block: several per block). On a
    CPU-only machine both pools are host memory and the same kernel runs interpreted."""
    dtype, n = torch.bfloat16, 7
    host_pool = random_bits((n + 4, BLOCK, 2, 8), dtype, seed=18, device="cpu", pin=PIN)
    device_pool = random_bits((n + 2, BLOCK, 2, 8), dtype, seed=19)
    g = torch.Generator().manual_seed(20)
    host_ids = torch.randperm(n + 4, generator=g)[:n]
    dst_ids = torch.randperm(n + 2, generator=g)[:n].to(DEV)
    expected = device_pool.cpu().clone()
    ops.paged_copy_blocks.reference(host_pool, host_ids, expected, dst_ids.cpu())
    block_bytes = math.prod(host_pool.shape[1:]) * host_pool.element_size()
    host_w, device_w = triton_paged._word_rows(host_pool, device_pool, unit=block_bytes)
    triton_paged.read_pinned_host(host_w, host_ids, device_w, dst_ids, programs=programs, tile_bytes=block_bytes // 4)
    assert_same_bytes(device_pool, expected)


class _TorchRowCopy:
    """Stands in for the Triton row-copy kernel (``kernel[grid](...)``) with torch ops, which
    functionalization rewrites as it does a triton_op's kernel: the copy of the paged module
    docstring, done in place on the word matrices the launcher passes."""

    def __getitem__(self, grid):
        return self.launch

    @staticmethod
    def launch(src, src_ids, src_id_stride, src_rows, src_row_stride, dst, dst_ids, dst_id_stride, dst_rows,
               rows_per_block, dst_block_stride, n_rows, row_len, *_, **__):
        every = torch.arange(n_rows, device=dst.device)
        s = every if src_ids is None else src_ids.long()
        rows = src[s.clamp(min=0), :row_len] * (s >= 0)[:, None]
        d = every if dst_ids is None else dst_ids.long()
        slots = dst.unflatten(1, (rows_per_block, row_len))  # [blocks, rows per block, row_len]
        n_slots = slots.shape[0] * rows_per_block
        # Which row lands in each slot (-1: none), computed without data-dependent shapes.
        source = torch.full((n_slots + 1,), -1, device=dst.device).scatter_(0, torch.where(d >= 0, d, n_slots), every)
        source = source[:-1]
        landed = torch.where((source >= 0)[:, None], rows[source.clamp(min=0)], slots.reshape(n_slots, row_len))
        slots.copy_(landed.view_as(slots))


def test_kernel_writes_survive_functionalization():
    """torch.compile functionalizes the traceable ops' bodies: the kernel's writes through the word
    views must become writes to the op's tensors. (Views built with as_strided cannot: Inductor
    rejected paged_gather's output view on a GPU.) AOTAutograd functionalizes the bodies here on
    any device, with the kernel replaced by torch ops; test_torch_compile_traces_the_triton_ops
    runs the real kernels under Inductor on a GPU."""
    from functorch.compile import aot_function, nop

    def functional(registered):  # its launcher (registration.kernel_op), launching the stand-in
        return aot_function(lambda *args: registered.__wrapped__(*args, launch=lambda kernel: _TorchRowCopy()),
                            fw_compiler=nop)

    cache = random_bits((6, 2, BLOCK, 2, 8), torch.float16, seed=21)[:, 1]  # dimension 0 strided
    values = random_bits((5, 2, 8), torch.float16, seed=22)
    slots, table = index([3, -1, 9, 22, 0], torch.int64), index([[2, -1], [5, 0]], torch.int32)
    src_ids, dst_ids = index([1, 4, 4], torch.int64), index([0, 5, 2], torch.int64)

    written, expected = cache.clone(), cache.clone()  # paged_write writes into its input
    functional(triton_paged.paged_write_triton)(written, values, slots)
    ops.paged_write.reference(expected, values, slots)
    assert_same_bytes(written, expected)

    gathered = functional(triton_paged.paged_gather_triton)(cache, table)  # a fresh output, written through views
    assert_same_bytes(gathered, ops.paged_gather.reference(cache, table.long()))

    copied, expected = cache.flip(0).clone(), cache.flip(0).clone()  # paged_copy_blocks writes into dst
    functional(triton_paged.paged_copy_blocks_triton)(cache, src_ids, copied, dst_ids)
    ops.paged_copy_blocks.reference(cache, src_ids, expected, dst_ids)
    assert_same_bytes(copied, expected)


def test_empty_inputs():
    cache = random_bits((5, BLOCK, 2, 8), torch.bfloat16, seed=12)
    before = cache.clone()
    empty_ids = torch.zeros(0, dtype=torch.int64, device=DEV)
    with apt_hal.use("cuda-triton", strict=True):
        ops.paged_write(cache, cache.new_empty((0, 2, 8)), empty_ids)
        ops.paged_copy_blocks(cache, empty_ids, cache.clone(), empty_ids)
        assert ops.paged_gather(cache, empty_ids).shape == (0, BLOCK, 2, 8)
        assert ops.paged_gather(cache, empty_ids.view(3, 0)).shape == (3, 0, BLOCK, 2, 8)
        empty_items = cache.new_empty((5, BLOCK, 0))
        assert ops.paged_gather(empty_items, index([1, -1], torch.int64)).shape == (2, BLOCK, 0)
    assert_same_bytes(cache, before)


@pytest.mark.parametrize("max_programs", [None, 1, 3], ids=["grid_of_tiles", "1_program", "3_programs"])
@pytest.mark.parametrize("tile_bytes", [64, 1024, 1 << 14])
def test_copy_rows_writes_every_byte_at_every_tiling(tile_bytes, max_programs):
    """Destination poisoned: rows wider than a tile (several column blocks, a partial last one),
    tiles of several rows with a partial last one, negative source ids (which write zeros), and
    capped grids whose programs loop over the tiles (a count that does not divide them)."""
    src = random_bits((9, 120), torch.int16, seed=13)[:, :100]  # rows of 100 words, stride 120
    dst = torch.full((7, 100), 0x5A5A, dtype=torch.int16, device=DEV)
    src_ids = index([4, -1, 0, 8, 8, -3, 2], torch.int64)
    triton_paged.launch_copy_rows(src, src_ids, dst, None, 7, 100, tile_bytes=tile_bytes, max_programs=max_programs)
    expected = torch.stack([src[i] if i >= 0 else torch.zeros_like(src[0]) for i in src_ids.tolist()])
    assert torch.equal(dst, expected)


def test_the_triton_implementations_are_what_run():
    cache = random_bits((6, BLOCK, 2, 8), torch.float16, seed=14)
    values = random_bits((5, 2, 8), torch.float16, seed=15)
    slots, table = index([3, -1, 9, 22, 0], torch.int64), index([[2, -1], [5, 0]], torch.int64)
    src_ids, dst_ids = index([1, 4], torch.int64), index([0, 5], torch.int64)
    with apt_hal.use("cuda-triton", strict=True):
        for op, fn, args in ((ops.paged_write, triton_paged.paged_write_triton, (cache, values, slots)),
                             (ops.paged_gather, triton_paged.paged_gather_triton, (cache, table)),
                             (ops.paged_copy_blocks, triton_paged.paged_copy_blocks_triton,
                              (cache, src_ids, cache.clone(), dst_ids))):
            assert registry.select(op, cache.device.type, args) is fn
        results = []
        for write, gather, copy in ((ops.paged_write, ops.paged_gather, ops.paged_copy_blocks),
                                    (triton_paged.paged_write_triton, triton_paged.paged_gather_triton,
                                     triton_paged.paged_copy_blocks_triton),
                                    (torch.ops.apt_hal_triton.paged_write, torch.ops.apt_hal_triton.paged_gather,
                                     torch.ops.apt_hal_triton.paged_copy_blocks)):
            c, d = cache.clone(), cache.clone()
            write(c, values, slots)
            copy(c, src_ids, d, dst_ids)
            results.append((c, d, gather(d, table)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same_bytes(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="torch.compile traces into Triton kernels only on a GPU")
def test_torch_compile_traces_the_triton_ops():
    cache = random_bits((64, BLOCK, 8, 128), torch.bfloat16, seed=16)
    values = random_bits((37, 8, 128), torch.bfloat16, seed=17)
    slots = torch.randperm(64 * BLOCK, device=DEV)[:37]
    table = torch.randint(-1, 64, (3, 9), device=DEV)
    src_ids, dst_ids = torch.randperm(64, device=DEV)[:10], torch.randperm(64, device=DEV)[:10]

    def step(cache, dst):
        torch.ops.apt_hal_triton.paged_write(cache, values, slots)
        torch.ops.apt_hal_triton.paged_copy_blocks(cache, src_ids, dst, dst_ids)
        return torch.ops.apt_hal_triton.paged_gather(dst, table)

    expected_cache, expected_dst = cache.clone(), cache.flip(0).clone()
    ops.paged_write.reference(expected_cache, values, slots)
    ops.paged_copy_blocks.reference(expected_cache, src_ids, expected_dst, dst_ids)
    expected = ops.paged_gather.reference(expected_dst, table)
    c, d = cache.clone(), cache.flip(0).clone()
    out = torch.compile(step, fullgraph=True)(c, d)
    assert_same_bytes(out, expected)
    assert_same_bytes(c, expected_cache)
    assert_same_bytes(d, expected_dst)
