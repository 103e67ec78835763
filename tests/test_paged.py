"""paged_tensor: the three ops' references on hand cases and error paths, and the PagedTensor store
(tiers, LRU eviction, pinning, prefetch, checksummed disk tier) against a plain dict model.

Store tests run on the ``dev`` fixture's device: on a GPU machine they also exercise pinned host
memory, the side stream and its events.
"""

import collections
import random
import re
import threading
import time

import pytest
import torch

import apt_hal
from apt_hal import ops
from apt_hal.errors import ContractError, CorruptBlockError, PagedStoreFullError
from apt_hal.paged_store import PagedTensor


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (NaN payloads included), for exact comparisons."""
    return t.contiguous().view(torch.uint8)


def _assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(_bits(actual.cpu()), _bits(expected.cpu()))


def _random_blocks(shape, dtype, gen) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN and Inf encodings included); 0/1 for bool."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


# ---------------------------------------------------------------------------------------------
# The ops' references: hand cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_write_skips_negative_slots(index_dtype):
    cache = torch.zeros(3, 2, 2)  # 3 blocks of 2 slots, items of 2
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    ops.paged_write(cache, values, torch.tensor([5, -1, 0, -7], dtype=index_dtype))
    expected = torch.zeros(3, 2, 2)
    expected[2, 1] = torch.tensor([1.0, 2.0])  # slot 5 = block 2, offset 1
    expected[0, 0] = torch.tensor([5.0, 6.0])
    torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=False)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_negative_entries_give_zero_blocks(index_dtype):
    cache = torch.arange(1, 25, dtype=torch.float32).reshape(4, 3, 2)
    table = torch.tensor([[2, -1, 0], [-1, -1, 3]], dtype=index_dtype)
    out = ops.paged_gather(cache, table)
    assert out.shape == (2, 3, 3, 2)
    zero = torch.zeros(3, 2)
    for b, row in enumerate(table.tolist()):
        for m, block in enumerate(row):
            torch.testing.assert_close(out[b, m], cache[block] if block >= 0 else zero, rtol=0, atol=0,
                                       equal_nan=False)


def test_copy_blocks_between_pools():
    src = torch.arange(4 * 2 * 3, dtype=torch.int64).reshape(4, 2, 3)
    dst = torch.full((6, 2, 3), -1, dtype=torch.int64)
    ops.paged_copy_blocks(src, torch.tensor([3, 0, 3]), dst, torch.tensor([0, 5, 2], dtype=torch.int32))
    expected = torch.full((6, 2, 3), -1, dtype=torch.int64)
    expected[0], expected[5], expected[2] = src[3], src[0], src[3]
    assert torch.equal(dst, expected)


def test_ops_on_per_layer_views_touch_only_their_layer():
    # A whole-model KV cache [blocks, layers, 2 (K/V), block_size, heads, head_dim]; a layer's K is a
    # pool whose first dimension is strided.
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(5, 3, 2, 4, 2, 3, generator=gen)
    before = big.clone()
    k1 = big[:, 1, 0]
    assert not k1.is_contiguous()
    values = torch.randn(3, 2, 3, generator=gen)
    ops.paged_write(k1, values, torch.tensor([9, 0, -1]))  # block 2 offset 1, block 0 offset 0
    expected = before.clone()
    expected[2, 1, 0, 1] = values[0]
    expected[0, 1, 0, 0] = values[1]
    assert torch.equal(big, expected)
    torch.testing.assert_close(ops.paged_gather(k1, torch.tensor([2, -1])),
                               torch.stack([expected[2, 1, 0], torch.zeros(4, 2, 3)]), rtol=0, atol=0)
    v2 = big[:, 2, 1]
    ops.paged_copy_blocks(k1, torch.tensor([2]), v2, torch.tensor([4]))
    expected[4, 2, 1] = expected[2, 1, 0]
    assert torch.equal(big, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float8_e4m3fn])
def test_ops_move_bytes_exactly(dtype):
    gen = torch.Generator().manual_seed(2)
    cache = _random_blocks((4, 2, 3), dtype, gen)
    values = _random_blocks((3, 3), dtype, gen)
    expected = cache.clone()
    ops.paged_write(cache, values, torch.tensor([7, 2, -1]))
    expected[3, 1], expected[1, 0] = values[0], values[1]
    _assert_same_bytes(cache, expected)
    out = ops.paged_gather(cache, torch.tensor([3, -1, 1]))
    _assert_same_bytes(out[0], expected[3])
    _assert_same_bytes(out[2], expected[1])
    assert not _bits(out[1]).any()
    dst = _random_blocks((2, 2, 3), dtype, gen)
    ops.paged_copy_blocks(cache, torch.tensor([1, 3]), dst, torch.tensor([1, 0]))
    _assert_same_bytes(dst, torch.stack([expected[3], expected[1]]))


def test_empty_inputs():
    cache = torch.randn(3, 2, 4)
    before = cache.clone()
    ops.paged_write(cache, torch.empty(0, 4), torch.empty(0, dtype=torch.int64))
    assert torch.equal(cache, before)
    assert ops.paged_gather(cache, torch.empty(0, dtype=torch.int32)).shape == (0, 2, 4)
    assert ops.paged_gather(cache, torch.empty(2, 0, dtype=torch.int32)).shape == (2, 0, 2, 4)
    dst = torch.randn(1, 2, 4)
    dst_before = dst.clone()
    ops.paged_copy_blocks(cache, torch.empty(0, dtype=torch.int64), dst, torch.empty(0, dtype=torch.int64))
    assert torch.equal(dst, dst_before)


def _pool(n=3, dtype=torch.float32, device="cpu"):
    return torch.zeros(n, 2, 4, dtype=dtype, device=device)


_I = torch.tensor
_OP_ERRORS = {
    "write: values dtype": (lambda: ops.paged_write(_pool(), torch.zeros(1, 4, dtype=torch.float16), _I([0])),
                            "'values' must have dtype float32"),
    "write: values item shape": (lambda: ops.paged_write(_pool(), torch.zeros(1, 5), _I([0])),
                                 "'values' must have shape"),
    "write: slot dtype": (lambda: ops.paged_write(_pool(), torch.zeros(1, 4), _I([0.0])),
                          "'slot_mapping' must have dtype"),
    "write: slot count": (lambda: ops.paged_write(_pool(), torch.zeros(2, 4), _I([0])),
                          "'slot_mapping' must have size 2"),
    "write: device": (lambda: ops.paged_write(_pool(), torch.zeros(1, 4, device="meta"), _I([0])),
                      "'values' is on meta"),
    "write: duplicate slots": (lambda: ops.paged_write(_pool(), torch.zeros(3, 4), _I([1, -1, 1])),
                               "'slot_mapping' names one slot more than once"),
    "write: slot out of range": (lambda: ops.paged_write(_pool(), torch.zeros(1, 4), _I([6])),
                                 r"'slot_mapping' must hold values in \[.*, 6\)"),
    "write: cache rank": (lambda: ops.paged_write(torch.zeros(4), torch.zeros(1), _I([0])),
                          "'cache' must have at least 2 dimensions"),
    "write: cache layout": (lambda: ops.paged_write(torch.zeros(3, 4, 2).transpose(1, 2), torch.zeros(1, 4), _I([0])),
                            "'cache' must be contiguous"),
    "gather: table dtype": (lambda: ops.paged_gather(_pool(), _I([0.5])), "'block_table' must have dtype"),
    "gather: device": (lambda: ops.paged_gather(_pool(), _I([0], device="meta")), "'block_table' is on meta"),
    "gather: id out of range": (lambda: ops.paged_gather(_pool(), _I([[0, 3]])),
                                r"'block_table' must hold values in \[.*, 3\)"),
    "copy: dtype": (lambda: ops.paged_copy_blocks(_pool(), _I([0]), _pool(dtype=torch.float16), _I([0])),
                    "'src' blocks .* and 'dst' blocks .* must have one shape and dtype"),
    "copy: block shape": (lambda: ops.paged_copy_blocks(_pool(), _I([0]), torch.zeros(3, 2, 5), _I([0])),
                          "'src' blocks .* and 'dst' blocks .* must have one shape and dtype"),
    "copy: id count": (lambda: ops.paged_copy_blocks(_pool(), _I([0, 1]), _pool(), _I([0])),
                       "'dst_ids' must have size 2"),
    "copy: src device": (lambda: ops.paged_copy_blocks(_pool(), _I([0], device="meta"), _pool(), _I([0])),
                         "'src_ids' is on meta"),
    "copy: dst device": (lambda: ops.paged_copy_blocks(_pool(), _I([0]), _pool(device="meta"), _I([0])),
                         "'dst_ids' is on cpu but 'dst' is on meta"),
    "copy: duplicate dst ids": (lambda: ops.paged_copy_blocks(_pool(), _I([0, 1]), _pool(), _I([2, 2])),
                                "'dst_ids' names one block more than once"),
    "copy: src id out of range": (lambda: ops.paged_copy_blocks(_pool(), _I([3]), _pool(), _I([0])),
                                  r"'src_ids' must hold values in \[0, 3\)"),
    "copy: negative dst id": (lambda: ops.paged_copy_blocks(_pool(), _I([0]), _pool(), _I([-1])),
                              r"'dst_ids' must hold values in \[0, 3\)"),
}


@pytest.mark.parametrize("case", list(_OP_ERRORS))
def test_op_errors_name_the_argument(case):
    call, message = _OP_ERRORS[case]
    with pytest.raises(ContractError, match=message):
        call()


def test_compile_and_export_keep_both_ops():
    def write_then_gather(pool, values, slot_mapping, table):
        ops.paged_write(pool, values, slot_mapping)
        return ops.paged_gather(pool, table)

    gen = torch.Generator().manual_seed(3)
    pool, values = torch.randn(4, 2, 3, generator=gen), torch.randn(3, 3, generator=gen)
    slot_mapping, table = torch.tensor([0, -1, 5]), torch.tensor([[0, 2], [-1, 1]])
    eager_pool = pool.clone()
    expected = write_then_gather(eager_pool, values, slot_mapping, table)

    compiled_pool = pool.clone()
    out = torch.compile(write_then_gather, fullgraph=True, backend="aot_eager")(compiled_pool, values, slot_mapping,
                                                                                 table)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=False)
    torch.testing.assert_close(compiled_pool, eager_pool, rtol=0, atol=0, equal_nan=False)

    class WriteThenGather(torch.nn.Module):
        def forward(self, pool, values, slot_mapping, table):
            return write_then_gather(pool, values, slot_mapping, table)

    program = torch.export.export(WriteThenGather(), (pool.clone(), values, slot_mapping, table))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"apt_hal.paged_write.default", "apt_hal.paged_gather.default"} <= targets
    exported_pool = pool.clone()
    torch.testing.assert_close(program.module()(exported_pool, values, slot_mapping, table), expected, rtol=0, atol=0)
    torch.testing.assert_close(exported_pool, eager_pool, rtol=0, atol=0, equal_nan=False)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def _store(dev, tmp_path, device=2, host=2, disk=2, block_shape=(2, 3), dtype=torch.float32):
    path = str(tmp_path / "blocks.bin") if disk else None
    return PagedTensor(block_shape, dtype, dev, device, host, path, disk)


def _fill(store, ids, gen):
    """Write a random block to each id; returns {id: block}."""
    blocks = {i: _random_blocks(store.block_shape, store.dtype, gen) for i in ids}
    for i, b in blocks.items():
        store.write_block(i, b)
    return blocks


def test_new_blocks_are_zero_on_every_tier(dev, tmp_path):
    store = _store(dev, tmp_path, device=1, host=1, disk=1)
    ids = store.allocate(3)
    assert [store.tier_of(i) for i in ids] == ["device", "host", "disk"]  # fastest tier with room
    for i in ids:
        assert torch.equal(store.read_block(i), torch.zeros(2, 3))
    store.free(ids)
    again = store.allocate(1)  # a freed block's bytes do not leak into a new one
    assert torch.equal(store.read_block(again[0]), torch.zeros(2, 3))


def test_lru_eviction_goes_to_host_and_host_lru_goes_to_disk(dev, tmp_path):
    gen = torch.Generator().manual_seed(4)
    store = _store(dev, tmp_path, device=2, host=2, disk=2)
    a, b, c, d = store.allocate(4)
    blocks = _fill(store, [a, b, c, d], gen)
    assert [store.tier_of(i) for i in (a, b, c, d)] == ["device", "device", "host", "host"]
    store.read_block(a)  # a is now more recent than b; c is the host's least recently used
    slots = store.device_slots([d])
    # b left the device; the full host first sent its least recently used block, c, to disk.
    assert [store.tier_of(i) for i in (a, b, c, d)] == ["device", "host", "disk", "device"]
    _assert_same_bytes(ops.paged_gather(store.pool, slots)[0], blocks[d])
    for i, block in blocks.items():
        _assert_same_bytes(store.read_block(i), block)
    stats = store.stats()
    assert stats["moved"] == {"device->host": 1, "host->disk": 1, "host->device": 1}
    assert stats["device"] == {"capacity": 2, "used": 2, "free": 0}
    assert stats["allocated"] == 4 and stats["in_flight"] == 0


def test_every_tier_full_still_swaps_blocks_in(dev, tmp_path):
    gen = torch.Generator().manual_seed(5)
    store = _store(dev, tmp_path, device=2, host=1, disk=2)
    ids = store.allocate(5)
    blocks = _fill(store, ids, gen)
    on_disk = [i for i in ids if store.tier_of(i) == "disk"]
    slots = store.device_slots(on_disk)  # every tier is full: the blocks leaving must take their slots
    assert [store.tier_of(i) for i in on_disk] == ["device", "device"]
    out = ops.paged_gather(store.pool, slots)
    for k, i in enumerate(on_disk):
        _assert_same_bytes(out[k], blocks[i])
    for i, block in blocks.items():
        _assert_same_bytes(store.read_block(i), block)


def test_pinned_blocks_stay_on_the_device(dev, tmp_path):
    gen = torch.Generator().manual_seed(6)
    store = _store(dev, tmp_path, device=2, host=4, disk=0)
    a, b, c, d = store.allocate(4)
    blocks = _fill(store, [a, b, c, d], gen)
    store.evict([a], "host")
    store.pin([a])  # brings a back to the device
    slot = store.device_slots([a]).item()
    for other in (b, c, d, b, c, d):
        store.device_slots([other])
        assert store.tier_of(a) == "device" and store.device_slots([a]).item() == slot
    with pytest.raises(PagedStoreFullError, match="1 of its 2 blocks are pinned and this call needs 2 there"):
        store.device_slots([b, c])
    with pytest.raises(ContractError, match="'ids' names pinned block"):
        store.evict([a], "host")
    with pytest.raises(ContractError, match="'ids' names pinned block"):
        store.free([a])
    store.pin([a])  # pins nest
    store.unpin([a])
    with pytest.raises(PagedStoreFullError):
        store.device_slots([b, c])
    store.unpin([a])
    with pytest.raises(ContractError, match="'ids' names block .*, which is not pinned"):
        store.unpin([a])
    store.device_slots([b, c])
    assert store.tier_of(a) == "host"
    for i, block in blocks.items():
        _assert_same_bytes(store.read_block(i), block)


def test_device_slots_feed_paged_write_and_gather_on_layer_views(dev, tmp_path):
    # A whole-model KV cache block: [layers, 2 (K/V), block_size, heads, head_dim].
    gen = torch.Generator().manual_seed(7)
    store = _store(dev, tmp_path, device=2, host=2, disk=3, block_shape=(2, 2, 4, 2, 3), dtype=torch.bfloat16)
    ids = store.allocate(3)
    expected = {i: torch.zeros(2, 2, 4, 2, 3, dtype=torch.bfloat16) for i in ids}
    for layer in range(2):
        slots = store.device_slots([ids[2], ids[0]])  # ids[2] starts on the host
        k, v = store.pool[:, layer, 0], store.pool[:, layer, 1]
        keys = torch.randn(5, 2, 3, generator=gen).to(torch.bfloat16)
        positions = [(0, 0), (0, 3), (1, 1), (1, 2), (0, 1)]  # (index in the table, offset)
        slot_mapping = torch.tensor([slots[j].item() * 4 + o for j, o in positions], device=dev)
        ops.paged_write(k, keys.to(dev), slot_mapping)
        ops.paged_write(v, (-keys).to(dev), slot_mapping)
        for t, (j, o) in enumerate(positions):
            block = [ids[2], ids[0]][j]
            expected[block][layer, 0, o], expected[block][layer, 1, o] = keys[t], -keys[t]
        gathered = ops.paged_gather(k, torch.stack([slots, torch.tensor([-1, -1], dtype=torch.int32, device=dev)]))
        _assert_same_bytes(gathered[0, 0], expected[ids[2]][layer, 0])
        _assert_same_bytes(gathered[0, 1], expected[ids[0]][layer, 0])
        assert not _bits(gathered[1]).any()
        store.evict(ids, "disk")
    for i in ids:
        _assert_same_bytes(store.read_block(i), expected[i])


def test_prefetch_then_wait_and_implicit_wait(dev, tmp_path):
    gen = torch.Generator().manual_seed(8)
    store = _store(dev, tmp_path, device=4, host=2, disk=6)
    ids = store.allocate(6)
    blocks = _fill(store, ids, gen)
    store.evict(ids[:2], "host")
    store.evict(ids[2:4], "disk")
    assert [store.tier_of(i) for i in ids[:4]] == ["host", "host", "disk", "disk"]
    handle = store.prefetch(ids[:4])
    handle.wait()
    assert handle.done()
    assert [store.tier_of(i) for i in ids[:4]] == ["device"] * 4
    for i in ids:
        _assert_same_bytes(store.read_block(i), blocks[i])

    store.evict(ids[:3], "disk")
    store.prefetch(ids[:3])  # no wait: the next access waits
    out = ops.paged_gather(store.pool, store.device_slots(ids[:3]))
    for k, i in enumerate(ids[:3]):
        _assert_same_bytes(out[k], blocks[i])
    store.evict(ids[:2], "disk")
    store.prefetch(ids[:2])
    for i in ids[:2]:
        _assert_same_bytes(store.read_block(i), blocks[i])
    store.close()


def test_a_prefetch_of_consecutive_slots_is_one_copy_and_scattered_slots_use_the_op(dev, tmp_path, monkeypatch):
    """Consecutive host slots to consecutive device slots take one Tensor.copy_ (no index tensors to
    upload, no staging); other prefetches go through paged_copy_blocks. Both move the right bytes."""
    gen = torch.Generator().manual_seed(12)
    store = _store(dev, tmp_path, device=4, host=6, disk=0)
    ids = store.allocate(6)
    blocks = _fill(store, ids, gen)
    store.evict(ids, "host")
    calls = []
    op = apt_hal.paged_store.paged_copy_blocks
    monkeypatch.setattr(apt_hal.paged_store, "paged_copy_blocks", lambda *a: (calls.append(a), op(*a)))
    host = store._tiers[1].blocks
    pairs = sorted(ids, key=lambda i: host[i])
    run = next(pairs[k:k + 2] for k in range(5) if host[pairs[k + 1]] == host[pairs[k]] + 1)
    store.prefetch(run).wait()  # two consecutive host slots into two free consecutive device slots
    assert calls == []
    assert [store.tier_of(i) for i in run] == ["device"] * 2
    rest = [i for i in pairs if i not in run]
    scattered = [rest[0], rest[2]] if host[rest[2]] != host[rest[0]] + 1 else [rest[0], rest[3]]
    store.prefetch(scattered).wait()  # host slots with a gap: the op
    assert len(calls) == 1
    for i in ids:
        _assert_same_bytes(store.read_block(i), blocks[i])
    store.close()


@pytest.mark.parametrize("access", ["wait", "read_block", "device_slots"])
def test_prefetch_reads_disk_in_a_background_thread(dev, tmp_path, monkeypatch, access):
    gen = torch.Generator().manual_seed(9)
    store = _store(dev, tmp_path, device=2, host=0, disk=2)
    a, b = store.allocate(2)
    c = store.allocate(1)[0]  # on disk
    blocks = _fill(store, [a, b, c], gen)
    store.read_block(a)
    store.read_block(b)  # the slot c will take holds other bytes, so reading it too early would fail
    readers, gate = [], threading.Event()
    disk_read = store._disk_read

    def gated_disk_read(ids, slots):
        readers.append(threading.current_thread())
        assert gate.wait(timeout=30)
        return disk_read(ids, slots)

    monkeypatch.setattr(store, "_disk_read", gated_disk_read)
    handle = store.prefetch([c])  # returns while the read is held at the gate
    assert not handle.done()
    assert store.stats()["in_flight"] == 1
    threading.Timer(0.2, gate.set).start()
    if access == "wait":
        handle.wait()
    elif access == "read_block":  # waits for the prefetch by itself
        _assert_same_bytes(store.read_block(c), blocks[c])
    else:
        _assert_same_bytes(ops.paged_gather(store.pool, store.device_slots([c]))[0], blocks[c])
    assert handle.done()
    _assert_same_bytes(store.read_block(c), blocks[c])
    assert len(readers) == 1 and readers[0] is not threading.main_thread()
    assert readers[0].name.startswith("apt_hal-paged-prefetch")
    for i in (a, b):
        _assert_same_bytes(store.read_block(i), blocks[i])
    store.close()


@pytest.mark.parametrize("full", [False, True], ids=["room on device", "every tier full"])
@pytest.mark.parametrize("where", ["checksum", "block id", "generation", "first data byte", "last data byte"])
def test_disk_corruption_is_detected(dev, tmp_path, where, full):
    gen = torch.Generator().manual_seed(10)
    store = _store(dev, tmp_path, device=1 if full else 2, host=0, disk=1)
    a, b = store.allocate(2)
    blocks = _fill(store, [a, b], gen)
    store.evict([b], "disk")  # b is the disk's only block
    path = tmp_path / "blocks.bin"
    record = 32 + 2 * 3 * 4  # header, then the block's bytes
    assert path.stat().st_size % record == 0
    offset = {"checksum": 0, "block id": 8, "generation": 16, "first data byte": 32,
              "last data byte": record - 1}[where]

    def flip():  # the same byte of every record, so b's record whichever it is
        with open(path, "r+b") as f:
            for start in range(0, path.stat().st_size, record):
                f.seek(start + offset)
                byte = f.read(1)[0]
                f.seek(start + offset)
                f.write(bytes([byte ^ 0x10]))

    flip()
    message = f"block {b} read from {re.escape(str(path))} .* does not match its CRC-32"
    with pytest.raises(CorruptBlockError, match=message):
        store.read_block(b)
    with pytest.raises(CorruptBlockError, match=message):
        store.device_slots([b])
    if full:  # the move needs b's slot for a, so it runs before prefetch returns
        with pytest.raises(CorruptBlockError, match=message):
            store.prefetch([b])
    else:
        handle = store.prefetch([b])
        with pytest.raises(CorruptBlockError, match=message):
            handle.wait()
    assert store.tier_of(b) == "disk" and store.tier_of(a) == "device"  # the failed moves changed nothing
    _assert_same_bytes(store.read_block(a), blocks[a])
    flip()  # undo: the block reads back whole, so the error was the flip's
    _assert_same_bytes(store.read_block(b), blocks[b])
    store.close()


def test_store_errors_name_the_argument(dev, tmp_path):
    with pytest.raises(ContractError, match="'block_shape' must be a non-empty tuple"):
        PagedTensor((), torch.float32, dev, 2)
    with pytest.raises(ContractError, match="'num_device_blocks' must be an int >= 1"):
        PagedTensor((2,), torch.float32, dev, 0)
    with pytest.raises(ContractError, match="'disk_path' and 'num_disk_blocks' go together"):
        PagedTensor((2,), torch.float32, dev, 2, num_disk_blocks=3)
    store = _store(dev, tmp_path, device=1, host=1, disk=0)
    ids = store.allocate(2)
    with pytest.raises(PagedStoreFullError, match="asked for 1 blocks but only 0 of 2 are free"):
        store.allocate(1)
    with pytest.raises(ContractError, match="'n' must be an int >= 0"):
        store.allocate(-1)
    with pytest.raises(ContractError, match="'ids' names block 7, which is not allocated"):
        store.read_block(7)
    with pytest.raises(ContractError, match="'ids' names one block more than once"):
        store.free([ids[0], ids[0]])
    with pytest.raises(ContractError, match=r"'value' must have shape \[2, 3\]"):
        store.write_block(ids[0], torch.zeros(3, 2))
    with pytest.raises(ContractError, match="'value' must have dtype float32"):
        store.write_block(ids[0], torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ContractError, match="'tier' must be a lower tier of this store \\('host'\\), got 'disk'"):
        store.evict(ids, "disk")
    with pytest.raises(PagedStoreFullError, match="2 blocks are needed on the device at once but its tier holds 1"):
        store.device_slots(ids)
    store.free(ids)
    with pytest.raises(ContractError, match="not allocated"):
        store.tier_of(ids[0])


# ---------------------------------------------------------------------------------------------
# The store against a dict model, under random operations
# ---------------------------------------------------------------------------------------------


class _Model:
    """What the store must hold: block bytes by id, pins, and the capacities."""

    def __init__(self, store):
        self.store = store
        self.blocks: dict[int, torch.Tensor] = {}
        self.pins: collections.Counter = collections.Counter()
        stats = store.stats()
        self.capacity = {t: stats[t]["capacity"] if t in stats else 0 for t in ("device", "host", "disk")}

    def check(self, i: int, actual: torch.Tensor) -> None:
        _assert_same_bytes(actual, self.blocks[i])

    def fits_on_device(self, ids) -> bool:
        return len(set(ids) | {i for i, n in self.pins.items() if n}) <= self.capacity["device"]


def _random_store_ops(store, n_ops: int, seed: int) -> collections.Counter:
    """Run ``n_ops`` random operations, checking every read against the model; returns what ran
    (``"<op>"``: succeeded, ``"<op>: full"`` / ``"<op>: pinned"``: raised as the model predicted)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _Model(store)
    dev, layers, block_size, item = store.device, store.block_shape[0], store.block_shape[1], store.block_shape[2:]
    total = sum(model.capacity.values())
    lower = [t for t in ("host", "disk") if model.capacity[t]]
    handles = []
    done = collections.Counter()

    def some(k_max, unique=True, unpinned=False):
        alive = sorted(i for i in model.blocks if not (unpinned and model.pins[i]))
        k = rng.randint(1, min(k_max, len(alive))) if alive else 0
        return rng.sample(alive, k) if unique else rng.choices(alive, k=k)

    def attempt(kind, fits, call):
        """``call()``, which must raise PagedStoreFullError exactly when ``fits`` is false."""
        if fits:
            done[kind] += 1
            return call()
        with pytest.raises(PagedStoreFullError):
            call()
        done[kind + ": full"] += 1
        return None

    def evict(ids, tier):
        """Must raise exactly when a block is pinned or the tiers from ``tier`` down lack room."""
        where = {i: store.tier_of(i) for i in model.blocks}
        order = ["device", *lower]
        moving = [i for i in ids if order.index(where[i]) < order.index(tier)]
        used = collections.Counter(where.values())
        room = sum(model.capacity[t] - used[t] for t in order[order.index(tier):])
        if any(model.pins[i] for i in ids):
            with pytest.raises(ContractError, match="pinned"):
                store.evict(ids, tier)
            done["evict: pinned"] += 1
        else:
            fits = len(moving) <= room
            attempt("evict", fits, lambda: store.evict(ids, tier))
            if fits:
                assert all(order.index(store.tier_of(i)) >= order.index(tier) for i in ids)

    kinds = ["allocate", "free", "write_block", "read_block", "paged_write", "paged_gather", "evict", "prefetch",
             "wait", "pin"]
    weights = [8, 8, 10, 15, 15, 15, 10, 10, 3, 6]
    for step in range(n_ops):
        kind = rng.choices(kinds, weights)[0]
        if not model.blocks:
            kind = "allocate"
        if kind == "allocate":
            n = rng.randint(1, 3)
            for i in attempt(kind, n <= total - len(model.blocks), lambda: store.allocate(n)) or []:
                assert i not in model.blocks
                model.blocks[i] = torch.zeros(store.block_shape, dtype=store.dtype)
        elif kind == "free":
            ids = some(3, unpinned=True)
            store.free(ids)
            for i in ids:
                del model.blocks[i]
            done[kind] += 1
        elif kind == "write_block":
            i = rng.choice(sorted(model.blocks))
            model.blocks[i] = _random_blocks(store.block_shape, store.dtype, gen)
            store.write_block(i, model.blocks[i].to(dev))
            done[kind] += 1
        elif kind == "read_block":
            i = rng.choice(sorted(model.blocks))
            model.check(i, store.read_block(i))
            done[kind] += 1
        elif kind == "paged_write":
            ids = some(model.capacity["device"])
            slots = attempt(kind, model.fits_on_device(ids), lambda: store.device_slots(ids))
            if slots is not None:
                layer = rng.randrange(layers)
                places = rng.sample([(j, o) for j in range(len(ids)) for o in range(block_size)],
                                    rng.randint(0, len(ids) * block_size))
                values = _random_blocks((len(places) + 1, *item), store.dtype, gen)
                slot_mapping = [slots[j].item() * block_size + o for j, o in places] + [-1]  # -1: a padding token
                ops.paged_write(store.pool[:, layer], values.to(dev), torch.tensor(slot_mapping, device=dev))
                for (j, o), value in zip(places, values):
                    model.blocks[ids[j]][layer, o] = value
        elif kind == "paged_gather":
            ids = some(model.capacity["device"] + 1, unique=False)  # a table may name a block twice
            slots = attempt(kind, model.fits_on_device(ids), lambda: store.device_slots(ids))
            if slots is not None:
                layer = rng.randrange(layers)
                unused = torch.tensor([rng.random() < 0.2 for _ in ids])
                table = torch.where(unused.to(dev), -1, slots)  # -1: an unused table entry
                assert table.dtype == torch.int32
                out = ops.paged_gather(store.pool[:, layer], table).cpu()
                for k, i in enumerate(ids):
                    expected = torch.zeros_like(model.blocks[i][layer]) if unused[k] else model.blocks[i][layer]
                    _assert_same_bytes(out[k], expected)
        elif kind == "evict" and lower:
            evict(some(3), rng.choice(lower))
        elif kind == "prefetch":
            ids = some(model.capacity["device"] + 1, unique=False)
            if lower and rng.random() < 0.5:  # from the lowest tier, as when an offloaded sequence resumes
                evict(sorted(set(ids)), lower[-1])
            handle = attempt(kind, model.fits_on_device(ids), lambda: store.prefetch(ids))
            if handle is not None:
                done["prefetch: in flight"] += store.stats()["in_flight"] > 0
                if rng.random() < 0.5:
                    handle.wait()
                    assert handle.done() and all(store.tier_of(i) == "device" for i in ids)
                else:
                    handles.append(handle)  # no wait: later accesses must wait by themselves
        elif kind == "wait" and handles:
            handles.pop(rng.randrange(len(handles))).wait()
            done[kind] += 1
        elif kind == "pin":
            pinned = sorted(i for i, n in model.pins.items() if n)
            if len(pinned) < model.capacity["device"] // 2 and rng.random() < 0.5:
                ids = some(2)
                attempt("pin", model.fits_on_device(ids), lambda: store.pin(ids))
                if model.fits_on_device(ids):
                    model.pins.update(ids)
                    assert all(store.tier_of(i) == "device" for i in ids)
            elif pinned:
                i = rng.choice(pinned)
                store.unpin([i])
                model.pins[i] -= 1
                done["unpin"] += 1
        if step % 5000 == 4999:
            for i in sorted(model.blocks):
                model.check(i, store.read_block(i))
            stats = store.stats()
            assert stats["allocated"] == len(model.blocks)
            assert stats["pinned"] == sum(1 for n in model.pins.values() if n)
    for i in sorted(model.blocks):
        model.check(i, store.read_block(i))
    store.close()
    return done


def test_store_matches_a_dict_model_under_100k_random_operations(dev, tmp_path, monkeypatch):
    # float16 blocks of random bits carry NaN and Inf encodings: every tier must move bytes, not values.
    store = PagedTensor((2, 2, 3), torch.float16, dev, 4, 4, str(tmp_path / "blocks.bin"), 6)
    disk_read = store._disk_read

    def slow_background_read(ids, slots):  # so that prefetches are still in flight when blocks are used
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.0002)
        return disk_read(ids, slots)

    monkeypatch.setattr(store, "_disk_read", slow_background_read)
    done = _random_store_ops(store, 100_000, seed=0)
    for kind in ("allocate", "free", "write_block", "read_block", "paged_write", "paged_gather", "evict", "prefetch",
                 "prefetch: in flight", "wait", "pin", "unpin"):
        assert done[kind] > 1000, (kind, done)  # every operation ran many times
    for refusal in ("allocate: full", "paged_write: full", "paged_gather: full", "evict: full", "evict: pinned",
                    "prefetch: full"):
        assert done[refusal] > 500, (refusal, done)  # and so did every refusal the model predicts
    moved = store.stats()["moved"]
    for route in ("device->host", "host->disk", "host->device", "disk->device", "device->disk", "device->parked"):
        assert moved.get(route, 0) > 1000, (route, moved)


@pytest.mark.parametrize("tiers", [(3, 0, 5), (3, 5, 0)], ids=["device+disk", "device+host"])
def test_store_with_two_tiers_matches_a_dict_model(dev, tmp_path, tiers):
    device, host, disk = tiers
    path = str(tmp_path / "blocks.bin") if disk else None
    store = PagedTensor((2, 2, 3), torch.int64, dev, device, host, path, disk)
    _random_store_ops(store, 10_000, seed=1)


# ---------------------------------------------------------------------------------------------
# The ops: mutated pools, meta tensors (issue 10)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "cuda-triton"])
def test_write_rejects_an_expanded_cache(backend):
    # Before: paged_write wrote into a stride-0 cache, every block aliasing one.
    cache = torch.zeros(1, 2, 4).expand(3, 2, 4)
    with apt_hal.use(backend), pytest.raises(ContractError, match="paged_write: argument 'cache' is written in place"):
        ops.paged_write(cache, torch.ones(1, 4), torch.tensor([0]))
    assert not cache.any()


@pytest.mark.parametrize("backend", ["cpu", "cuda-triton"])
def test_copy_blocks_rejects_an_expanded_dst(backend):
    dst = torch.zeros(1, 2, 4).expand(3, 2, 4)
    with apt_hal.use(backend), pytest.raises(ContractError,
                                             match="paged_copy_blocks: argument 'dst' is written in place"):
        ops.paged_copy_blocks(torch.ones(3, 2, 4), torch.tensor([0]), dst, torch.tensor([1]))
    assert not dst.any()


def test_meta_pools_give_meta_results_at_every_check_level():
    # Before: "Tensor.item() cannot be called on meta tensors" from the value checks.
    pool = torch.empty(4, 2, 3, device="meta")
    for level in ("none", "metadata", "values"):
        previous = apt_hal.set_checks(level)
        try:
            out = ops.paged_gather(pool, torch.empty(2, 3, dtype=torch.int64, device="meta"))
            ops.paged_write(pool, torch.empty(5, 3, device="meta"), torch.empty(5, dtype=torch.int32, device="meta"))
            ops.paged_copy_blocks(pool, torch.empty(2, dtype=torch.int64, device="meta"), pool,
                                  torch.empty(2, dtype=torch.int64, device="meta"))
        finally:
            apt_hal.set_checks(previous)
        assert out.is_meta and out.shape == (2, 3, 2, 3)


def test_meta_src_into_a_cpu_pool_is_an_error_not_a_silent_no_op():
    meta = dict(device="meta", dtype=torch.int64)
    with pytest.raises(ContractError,
                       match="paged_copy_blocks: argument 'dst' is on cpu but other arguments are on meta"):
        ops.paged_copy_blocks(torch.empty(3, 2, 4, device="meta"), torch.zeros(1, **meta), torch.zeros(3, 2, 4),
                              torch.zeros(1, dtype=torch.int64))


def test_gather_from_an_empty_pool_gives_zero_blocks():
    # Before: the reference indexed block 0 of a pool without blocks (IndexError).
    empty = torch.zeros(0, 2, 4, dtype=torch.bfloat16)
    out = ops.paged_gather(empty, _I([[-1, -1], [-1, -1]]))
    assert out.shape == (2, 2, 2, 4) and out.dtype == torch.bfloat16 and not out.any()
    with pytest.raises(ContractError, match=r"'block_table' must hold values in \[0, 0\) or negative, found 0"):
        ops.paged_gather(empty, _I([0]))


# ---------------------------------------------------------------------------------------------
# Frozen blocks: a copy kept on the lower tier, no bytes moved going back to it (issue 17)
# ---------------------------------------------------------------------------------------------


def _check_all(store, expected: dict) -> None:
    for i, block in expected.items():
        _assert_same_bytes(store.read_block(i), block)


def test_a_frozen_block_goes_back_to_its_host_copy_without_moving_bytes(dev, tmp_path):
    gen = torch.Generator().manual_seed(11)
    store = _store(dev, tmp_path, device=2, host=3, disk=0)
    a, b, c = store.allocate(3)  # a, b on the device; c on the host
    blocks = _fill(store, [a, b, c], gen)
    store.freeze([c])
    store.device_slots([c])  # a (least recently used) goes to the host for real; c's host slot is kept
    assert store.tier_of(c) == "device"
    assert store.stats()["host"] == {"capacity": 3, "used": 1, "free": 1, "kept": 1}
    store.evict([c], "host")
    stats = store.stats()
    assert stats["moved"] == {"device->host": 1, "host->device": 1}  # a's eviction and c's trip up only
    assert stats["dropped"] == {"device->host": 1}
    assert stats["host"] == {"capacity": 3, "used": 2, "free": 1, "kept": 0} and stats["frozen"] == 1
    assert store.tier_of(c) == "host"
    _check_all(store, blocks)

    with pytest.raises(ContractError, match=f"write_block: argument 'id' names block {c}, which is frozen: "
                                            "its bytes cannot change"):
        store.write_block(c, torch.zeros(2, 3))
    _check_all(store, blocks)  # the refused write changed nothing
    store.unfreeze([c])
    blocks[c] = _random_blocks((2, 3), torch.float32, gen)
    store.write_block(c, blocks[c])
    store.device_slots([c])
    store.evict([c], "host")  # no longer frozen: a real copy
    assert store.stats()["moved"]["device->host"] == 2 and store.stats()["dropped"] == {"device->host": 1}
    _check_all(store, blocks)

    store.freeze([c])
    store.device_slots([c])
    assert store.stats()["host"]["kept"] == 1
    store.free([c])  # releases the kept copy: its host slot is free again
    del blocks[c]
    stats = store.stats()
    assert stats["host"] == {"capacity": 3, "used": 1, "free": 2, "kept": 0} and stats["frozen"] == 0
    _check_all(store, blocks)
    store.close()


def test_a_frozen_block_allocated_on_the_device_is_copied_down_once(dev, tmp_path):
    gen = torch.Generator().manual_seed(12)
    store = _store(dev, tmp_path, device=1, host=2, disk=0)
    a = store.allocate(1)[0]  # on the device: no lower copy yet
    blocks = _fill(store, [a], gen)
    store.freeze([a])
    for _ in range(3):
        store.evict([a], "host")
        store.device_slots([a])
        _check_all(store, blocks)
    stats = store.stats()
    assert stats["moved"] == {"device->host": 1, "host->device": 3}
    assert stats["dropped"] == {"device->host": 2}


def test_kept_copies_give_way_when_a_tier_needs_room(dev, tmp_path):
    gen = torch.Generator().manual_seed(13)
    store = _store(dev, tmp_path, device=2, host=3, disk=0)
    ids = store.allocate(5)  # 2 on the device, 3 on the host
    blocks = _fill(store, ids, gen)
    store.free(ids[:2])
    del blocks[ids[0]], blocks[ids[1]]
    c, d, e = ids[2:]
    store.freeze([c, d])
    store.device_slots([c, d])
    assert store.stats()["host"] == {"capacity": 3, "used": 1, "free": 0, "kept": 2}  # full of copies
    f = store.allocate(1)[0]  # the host has no free slot: c's copy (the oldest) gives way
    assert store.tier_of(f) == "host" and store.stats()["host"]["kept"] == 1
    blocks.update(_fill(store, [f], gen))
    _check_all(store, blocks)
    store.evict([d], "host")  # d's copy is still kept
    assert store.stats()["dropped"] == {"device->host": 1}
    store.device_slots([f, e])  # c has no copy left: moving it down copies it, into a slot another block leaves
    assert store.stats()["moved"].get("device->parked", 0) + store.stats()["moved"].get("device->host", 0) >= 1
    _check_all(store, blocks)
    store.close()


def test_a_frozen_block_on_disk_keeps_its_checked_record(dev, tmp_path):
    gen = torch.Generator().manual_seed(14)
    store = _store(dev, tmp_path, device=1, host=0, disk=2)
    a, b = store.allocate(2)  # a on the device, b on disk
    blocks = _fill(store, [a, b], gen)
    store.freeze([b])
    store.device_slots([b])  # a goes down for real; b's record is kept
    writes = store._disk._writes
    store.evict([b], "disk")
    assert store._disk._writes == writes  # nothing was written to the file
    assert store.stats()["dropped"] == {"device->disk": 1}
    assert store.stats()["moved"] == {"device->disk": 1, "disk->device": 1}
    _check_all(store, blocks)  # b's kept record still verifies
    store.prefetch([b]).wait()  # in the background this time
    store.evict([b], "disk")
    assert store.stats()["dropped"] == {"device->disk": 2} and store._disk._writes == writes
    _check_all(store, blocks)

    path, record = tmp_path / "blocks.bin", 32 + 2 * 3 * 4
    with open(path, "r+b") as f:  # flip the first data byte of every record, b's kept one included
        for start in range(0, path.stat().st_size, record):
            f.seek(start + 32)
            byte = f.read(1)[0]
            f.seek(start + 32)
            f.write(bytes([byte ^ 0x10]))
    with pytest.raises(CorruptBlockError, match=f"block {b} read from .* does not match its CRC-32"):
        store.read_block(b)
    with pytest.raises(CorruptBlockError, match=f"block {b} read from .* does not match its CRC-32"):
        store.device_slots([b])
    assert store.tier_of(b) == "disk"
    store.close()


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no wait"])
def test_a_prefetched_frozen_block_goes_back_without_moving_bytes(dev, tmp_path, wait):
    gen = torch.Generator().manual_seed(15)
    store = _store(dev, tmp_path, device=2, host=2, disk=2)
    ids = store.allocate(4)
    blocks = _fill(store, ids, gen)
    store.evict(ids[:2], "host")
    store.evict(ids[2:], "disk")
    store.freeze(ids)
    home = {i: store.tier_of(i) for i in ids}
    before = store.stats()["moved"]
    for pair in (ids[:2], ids[2:], [ids[0], ids[3]]):  # from the host (side stream), from disk (thread), both
        handle = store.prefetch(pair)
        if wait:
            handle.wait()
        for i in pair:  # evict waits for a prefetch still in flight
            store.evict([i], home[i])
    stats = store.stats()
    moved = {route: n - before.get(route, 0) for route, n in stats["moved"].items() if n > before.get(route, 0)}
    assert moved == {"host->device": 3, "disk->device": 3}  # up only: nothing went down for real
    assert stats["dropped"] == {"device->host": 3, "device->disk": 3}
    _check_all(store, blocks)
    store.close()


def test_frozen_blocks_match_a_dict_model_under_random_operations(dev, tmp_path):
    """allocate / write_block / freeze / unfreeze / device_slots (+ paged_write to unfrozen blocks) /
    prefetch / evict / free at random on a small three-tier store: every block reads back right."""
    rng, gen = random.Random(2), torch.Generator().manual_seed(2)
    store = PagedTensor((2, 3), torch.float16, dev, 3, 3, str(tmp_path / "blocks.bin"), 4)
    capacity = {"device": 3, "host": 3, "disk": 4}
    order = list(capacity)
    blocks: dict[int, torch.Tensor] = {}
    frozen: set[int] = set()
    done = collections.Counter()

    def some(k_max):
        alive = sorted(blocks)
        return rng.sample(alive, rng.randint(1, min(k_max, len(alive))))

    for step in range(20_000):
        kind = rng.choice(["allocate", "write_block", "freeze", "unfreeze", "device_slots", "prefetch", "evict",
                           "free", "read_block"]) if blocks else "allocate"
        if kind == "allocate":
            n = rng.randint(1, 2)
            if n > sum(capacity.values()) - len(blocks):
                with pytest.raises(PagedStoreFullError):
                    store.allocate(n)
                kind += ": full"
            else:  # kept copies never stand in the way of a new block
                blocks.update((i, torch.zeros(2, 3, dtype=torch.float16)) for i in store.allocate(n))
        elif kind == "write_block":
            i = rng.choice(sorted(blocks))
            value = _random_blocks((2, 3), torch.float16, gen)
            if i in frozen:
                with pytest.raises(ContractError, match="frozen: its bytes cannot change"):
                    store.write_block(i, value.to(dev))
                kind += ": frozen"
            else:
                store.write_block(i, value.to(dev))
                blocks[i] = value
        elif kind == "freeze":
            ids = some(3)
            store.freeze(ids)
            frozen.update(ids)
        elif kind == "unfreeze":
            ids = some(3)
            store.unfreeze(ids)
            frozen.difference_update(ids)
        elif kind == "device_slots":
            ids = some(3)
            slots = store.device_slots(ids)
            writable = [k for k, i in enumerate(ids) if i not in frozen]
            if writable and rng.random() < 0.5:  # write through the pool: only blocks that are not frozen
                values = _random_blocks((len(writable), 2, 3), torch.float16, gen)
                mapping = torch.tensor([slots[k].item() * 2 + o for k in writable for o in range(2)], device=dev)
                ops.paged_write(store.pool, values.reshape(-1, 3).to(dev), mapping)
                for k, value in zip(writable, values):
                    blocks[ids[k]] = value
            out = ops.paged_gather(store.pool, slots).cpu()
            for k, i in enumerate(ids):
                _assert_same_bytes(out[k], blocks[i])
        elif kind == "prefetch":
            handle = store.prefetch(some(3))
            if rng.random() < 0.5:
                handle.wait()
        elif kind == "evict":
            ids, tier = some(3), rng.choice(["host", "disk"])
            where = {i: store.tier_of(i) for i in blocks}
            moving = [i for i in ids if order.index(where[i]) < order.index(tier)]
            used = collections.Counter(where.values())
            room = sum(capacity[t] - used[t] for t in order[order.index(tier):])  # a kept copy's slot counts
            if len(moving) <= room:
                store.evict(ids, tier)
                assert all(order.index(store.tier_of(i)) >= order.index(tier) for i in ids)
            else:
                with pytest.raises(PagedStoreFullError):
                    store.evict(ids, tier)
                kind += ": full"
        elif kind == "free":
            ids = some(2)
            store.free(ids)
            for i in ids:
                del blocks[i]
            frozen.difference_update(ids)
        else:
            i = rng.choice(sorted(blocks))
            _assert_same_bytes(store.read_block(i), blocks[i])
        done[kind] += 1
        if step % 1000 == 999:
            _check_all(store, blocks)
            stats = store.stats()
            assert stats["allocated"] == len(blocks) and stats["frozen"] == len(frozen)
            if stats["in_flight"] == 0:
                for t in ("host", "disk"):
                    assert stats[t]["used"] + stats[t]["free"] + stats[t]["kept"] == capacity[t], stats
    _check_all(store, blocks)
    stats = store.stats()
    store.close()
    for kind in ("allocate", "allocate: full", "write_block", "write_block: frozen", "freeze", "unfreeze",
                 "device_slots", "prefetch", "evict", "evict: full", "free", "read_block"):
        assert done[kind] > 100, (kind, done)
    assert stats["dropped"].get("device->host", 0) > 100 and stats["dropped"].get("device->disk", 0) > 100, stats
    assert stats["moved"].get("device->host", 0) > 100, stats


def test_device_slot_is_device_slots_as_a_host_int():
    """device_slot(id) brings a block up like device_slots([id]) and returns its slot as a Python
    int (streamed layers look their slot up without reading device memory)."""
    store = PagedTensor((4,), torch.float32, "cpu", 2, 2)
    ids = store.allocate(4)
    for i in ids:
        store.write_block(i, torch.full((4,), float(i)))
    for i in reversed(ids):
        slot = store.device_slot(i)
        assert isinstance(slot, int) and store.tier_of(i) == "device"
        assert slot == int(store.device_slots([i])[0]) and torch.equal(store.pool[slot], torch.full((4,), float(i)))
    with pytest.raises(ContractError, match="argument 'ids' names block 99, which is not allocated"):
        store.device_slot(99)
