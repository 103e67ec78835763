"""The PagedTensor store's disk tier under faults: a full disk, failed and short and lost writes,
a truncated file, swapped, stale and flipped records, a second opener. Nothing may be lost: every
operation either does what it says with the right bytes or raises its documented error, and every
block not damaged from outside reads back right.

Write faults come from a fake I/O layer: the store writes through ``os.pwritev`` / ``os.pwrite``,
which these tests replace. A full disk is also produced for real, with a file-size limit
(``RLIMIT_FSIZE``) in a subprocess.
"""

import collections
import errno
import gc
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from apt_hal.errors import CorruptBlockError, PagedStoreDiskError, PagedStoreFullError
from apt_hal.paged_store import PagedTensor

BLOCK = (2, 3)
RECORD = 32 + 2 * 3 * 2  # header, then the float16 block's bytes


def _random_block(rng: random.Random) -> torch.Tensor:
    """Random float16 bit patterns, NaN and Inf encodings included."""
    return torch.tensor([rng.getrandbits(16) for _ in range(6)], dtype=torch.int32).to(torch.int16).view(
        torch.float16).reshape(BLOCK)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def _disk_records(store) -> dict:
    """{record: block id} of the blocks on disk or being read from it, from the store's books: what damage
    to a record hits."""
    records = {record: i for i, record in store._tiers[-1].blocks.items()}
    for transfer in set(store._pending.values()):
        if transfer.source.pool is None:
            records.update(zip(transfer.source_slots, transfer.ids))
    return records


class _FaultyWrites:
    """A fake I/O layer between the store and the file: each armed fault applies to the next write."""

    FAILING = ("ENOSPC", "EIO", "short, then ENOSPC")
    KINDS = (*FAILING, "short, then the rest", "lost")

    def __init__(self, monkeypatch):
        self._pwritev, self._pwrite = os.pwritev, os.pwrite
        self.armed: list[str] = []
        self.fail_next_pwrite = False
        self.lost: list[int] = []  # records whose write was dropped while reported done
        self.failed = 0  # failing faults that took effect
        monkeypatch.setattr(os, "pwritev", self.pwritev)
        monkeypatch.setattr(os, "pwrite", self.pwrite)

    def pwritev(self, fd, buffers, offset):
        fault = self.armed.pop(0) if self.armed else None
        total = sum(memoryview(b).nbytes for b in buffers)
        if fault in ("ENOSPC", "EIO"):
            self.failed += 1
            raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
        if fault == "lost":
            self.lost.append(offset // RECORD)
            return total
        if fault is not None:  # a short write: only the header gets there
            self.fail_next_pwrite = fault == "short, then ENOSPC"
            return self._pwritev(fd, buffers[:1], offset)
        return self._pwritev(fd, buffers, offset)

    def pwrite(self, fd, data, offset):
        if self.fail_next_pwrite:
            self.fail_next_pwrite = False
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._pwrite(fd, data, offset)


# ---------------------------------------------------------------------------------------------
# Each fault on its own
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_fails_at_construction_naming_the_file(tmp_path):
    # A real "file too large" from the kernel: the limit is below the file a big store needs.
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from apt_hal.errors import PagedStoreDiskError
        from apt_hal.paged_store import PagedTensor
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            PagedTensor((1024,), torch.float32, "cpu", 1, 0, {str(tmp_path / "big.bin")!r}, 64)
        except PagedStoreDiskError as e:
            print("refused:", e.errno, e)
        with PagedTensor((1024,), torch.float32, "cpu", 1, 0, {str(tmp_path / "small.bin")!r}, 8) as store:
            ids = store.allocate(9)  # 8 of them on disk
            for i in ids:
                store.write_block(i, torch.full((1024,), float(i)))
            assert all(torch.equal(store.read_block(i), torch.full((1024,), float(i))) for i in ids)
            print("small store ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path = re.escape(str(tmp_path / "big.bin"))
    assert re.search(rf"refused: {errno.EFBIG} apt_hal.PagedTensor: cannot reserve \d+ bytes for the disk tier "
                     rf"\(65 records\) in {path}: File too large \(EFBIG\)", out.stdout), out.stdout
    assert "small store ok" in out.stdout
    assert not (tmp_path / "big.bin").exists()  # a refused store leaves no file behind


@pytest.mark.parametrize("fault", _FaultyWrites.FAILING)
def test_a_failed_write_moves_and_changes_nothing(tmp_path, monkeypatch, fault):
    rng = random.Random(1)
    store = PagedTensor(BLOCK, torch.float16, "cpu", 2, 1, str(tmp_path / "blocks.bin"), 2)
    ids = store.allocate(4)  # one disk slot stays free
    blocks = {i: _random_block(rng) for i in ids}
    for i, b in blocks.items():
        store.write_block(i, b)
    faults = _FaultyWrites(monkeypatch)
    where = {i: store.tier_of(i) for i in ids}
    on_device = [i for i in ids if where[i] == "device"]
    on_disk = [i for i in ids if where[i] == "disk"]
    path = re.escape(str(tmp_path / "blocks.bin"))
    reason = "No space left on device \\(ENOSPC\\)" if "ENOSPC" in fault else "Input/output error \\(EIO\\)"

    faults.armed = [fault]  # the device -> host move must first send the host's block to disk
    with pytest.raises(PagedStoreDiskError, match=f"writing block \\d+ to {path} \\(record \\d+\\) failed .*{reason}"):
        store.evict(on_device[:1], "host")
    faults.armed = [fault]  # rewriting a block that is on disk
    with pytest.raises(PagedStoreDiskError, match=reason):
        store.write_block(on_disk[0], _random_block(rng))
    assert {i: store.tier_of(i) for i in ids} == where
    for i, b in blocks.items():
        assert _same(store.read_block(i), b)

    faults.armed = [fault]  # a new block lands on disk (the only free slot): it is given back
    with pytest.raises(PagedStoreDiskError):
        store.allocate(1)
    assert store.stats()["allocated"] == 4
    assert faults.failed == 3

    new = store.allocate(1)[0]
    ids.append(new)
    blocks[new] = torch.zeros(BLOCK, dtype=torch.float16)
    wanted = [i for i in ids if store.tier_of(i) == "disk"]
    faults.armed = [fault]  # every tier full: the blocks leaving the device are parked, then written down
    with pytest.raises(PagedStoreDiskError):
        store.device_slots(wanted)
    assert store.stats()["parked"] >= 1
    for i in ids:
        assert _same(store.read_block(i), blocks[i])
    parked = [i for i in ids if store.tier_of(i) == "parked"]
    store.evict(parked, "host")  # a parked block moves like any other
    for i in ids:
        assert _same(store.read_block(i), blocks[i])
    assert store.stats()["parked"] == 0
    store.close()


def test_a_short_write_is_finished(tmp_path, monkeypatch):
    with PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(tmp_path / "blocks.bin"), 2) as store:
        faults = _FaultyWrites(monkeypatch)
        a, b = store.allocate(2)
        value = _random_block(random.Random(2))
        faults.armed = ["short, then the rest"]
        store.write_block(b, value)
        assert not faults.armed and _same(store.read_block(b), value)


def _read_error(store, i) -> str:
    with pytest.raises(CorruptBlockError) as caught:
        store.read_block(i)
    return str(caught.value)


def test_swapped_stale_and_truncated_records_are_refused(tmp_path):
    path = tmp_path / "blocks.bin"
    rng = random.Random(3)
    with PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 4) as store:
        ids = store.allocate(4)  # one disk record stays free
        blocks = {i: _random_block(rng) for i in ids}
        for i, b in blocks.items():
            store.write_block(i, b)
        records = {i: r for r, i in _disk_records(store).items()}
        x, y, z = [i for i in ids if i in records]
        raw = path.read_bytes()

        def record(i, data=raw):
            return data[records[i] * RECORD:(records[i] + 1) * RECORD]

        def put(i, data):
            with open(path, "r+b") as f:
                f.seek(records[i] * RECORD)
                f.write(data)

        put(x, record(y))
        put(y, record(x))
        assert re.search(rf"block {x} read from {re.escape(str(path))} \(record \d+\) holds the record of block {y}: "
                         "records were swapped", _read_error(store, x))
        assert f"holds the record of block {x}" in _read_error(store, y)
        with pytest.raises(CorruptBlockError):
            store.device_slots([x])
        assert store.tier_of(x) == "disk"
        put(x, record(x))
        put(y, record(y))

        # A lost write: z moves up and back down into the same record, and the file keeps the old one.
        store.device_slots([z])
        store.evict([z], "disk")
        assert {i: r for r, i in _disk_records(store).items()}[z] == records[z]
        put(z, record(z))
        assert re.search(rf"block {z} .* holds write generation \d+, expected \d+: a stale record",
                         _read_error(store, z))
        store.write_block(z, blocks[z])  # rewriting repairs it

        os.truncate(path, records[x] * RECORD + RECORD // 2)
        assert "is cut short" in _read_error(store, x) and "(it was truncated)" in _read_error(store, x)
        for i in ids:
            if records.get(i, -1) < records[x]:
                assert _same(store.read_block(i), blocks[i])


def test_a_second_store_on_a_path_is_refused(tmp_path):
    path = tmp_path / "blocks.bin"
    rng = random.Random(4)
    first = PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2)
    ids = first.allocate(3)
    blocks = {i: _random_block(rng) for i in ids}
    for i, b in blocks.items():
        first.write_block(i, b)
    before = path.read_bytes()
    message = f"the disk tier's file {re.escape(str(path))} is in use by another PagedTensor"
    for overwrite in (False, True):
        with pytest.raises(PagedStoreDiskError, match=message):
            PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2, overwrite=overwrite)
    other_process = textwrap.dedent(f"""
        import torch
        from apt_hal.paged_store import PagedTensor
        PagedTensor((2, 3), torch.float16, "cpu", 1, 0, {str(path)!r}, 2, overwrite=True)
    """)
    out = subprocess.run([sys.executable, "-c", other_process], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and re.search(message, out.stderr), out.stderr
    assert path.read_bytes() == before
    for i, b in blocks.items():
        assert _same(first.read_block(i), b)
    first.close()
    assert not path.exists()  # close deletes the store's file and releases its lock
    with PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2) as again:
        again.allocate(3)
    assert not path.exists()


def test_an_existing_file_is_kept_unless_overwrite_is_asked(tmp_path):
    path = tmp_path / "blocks.bin"
    path.write_bytes(b"someone's data")
    with pytest.raises(PagedStoreDiskError, match=f"'disk_path' names an existing file, {re.escape(str(path))}; .* "
                                                  "pass overwrite=True"):
        PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2)
    assert path.read_bytes() == b"someone's data"
    with PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2, overwrite=True) as store:
        (i, j) = store.allocate(2)
        assert _same(store.read_block(j), torch.zeros(BLOCK, dtype=torch.float16))
        assert path.stat().st_size == 3 * RECORD  # the old contents are gone, the records reserved
    assert not path.exists()


def test_garbage_collection_releases_the_file(tmp_path):
    path = tmp_path / "blocks.bin"
    store = PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2)
    store.allocate(2)
    del store
    gc.collect()
    assert not path.exists()
    PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 2).close()


# ---------------------------------------------------------------------------------------------
# All of them at once, against a dict model
# ---------------------------------------------------------------------------------------------


def test_no_block_is_lost_or_wrong_under_random_operations_and_faults(tmp_path, monkeypatch):
    path = tmp_path / "blocks.bin"
    store = PagedTensor(BLOCK, torch.float16, "cpu", 3, 2, str(path), 4)
    capacity = {"device": 3, "host": 2, "disk": 4}
    order = ["device", "host", "disk"]
    faults = _FaultyWrites(monkeypatch)
    rng = random.Random(0)
    model: dict[int, torch.Tensor] = {}  # what each block must hold
    damaged: set[int] = set()  # blocks whose disk record was damaged from outside: reads must raise
    snapshots: list[tuple[int, bytes]] = []  # (record, bytes) taken earlier, to put back as stale records
    handles = []
    done = collections.Counter()

    def rank(tier):  # a parked block is in device memory
        return order.index(tier) if tier in order else 0

    def some(k_max):
        alive = sorted(model)
        return rng.sample(alive, rng.randint(1, min(k_max, len(alive))))

    def damage(records):
        hit = _disk_records(store)
        blocks = {hit[r] for r in records if r in hit}
        damaged.update(blocks)
        for _, _, seen in handles:
            seen.update(blocks)

    def check_all():
        for i in sorted(model):
            if i in damaged:
                assert store.tier_of(i) == "disk"
                with pytest.raises(CorruptBlockError, match=f"block {i} read from"):
                    store.read_block(i)
            else:
                assert _same(store.read_block(i), model[i]), i
        stats = store.stats()
        assert stats["allocated"] == len(model)
        assert sum(stats[t]["used"] for t in order) + stats["parked"] == len(model)

    def outside_damage():
        # Damage lands between prefetches: a record a background read has already taken is not damaged.
        while handles:
            handle, ids, damaged_since = handles.pop()
            try:
                handle.wait()
            except CorruptBlockError as e:
                assert int(re.search(r"block (\d+) read from", str(e)).group(1)) in damaged_since
        kind = rng.choice(["swap", "stale", "flip", "truncate", "second opener", "snapshot"])
        size = path.stat().st_size
        # Only records of undamaged blocks: damaging one twice could undo it (a swap back, a stale copy).
        live = [r for r, i in sorted(_disk_records(store).items()) if i not in damaged]
        if kind == "second opener":
            with pytest.raises(PagedStoreDiskError, match="is in use by another PagedTensor"):
                PagedTensor(BLOCK, torch.float16, "cpu", 1, 0, str(path), 1, overwrite=rng.random() < 0.5)
        elif kind == "snapshot" and live:
            r = rng.choice(live)
            with open(path, "rb") as f:
                snapshots.append((r, os.pread(f.fileno(), RECORD, r * RECORD)))
        elif kind == "stale" and snapshots:
            r, old = snapshots.pop(rng.randrange(len(snapshots)))
            with open(path, "r+b") as f:
                if r in _disk_records(store) and r not in live or os.pread(f.fileno(), RECORD, r * RECORD) == old:
                    return
                os.pwrite(f.fileno(), old, r * RECORD)
            damage([r])
        elif kind == "swap" and len(live) >= 2:
            r, s = rng.sample(live, 2)
            with open(path, "r+b") as f:
                a, b = os.pread(f.fileno(), RECORD, r * RECORD), os.pread(f.fileno(), RECORD, s * RECORD)
                os.pwrite(f.fileno(), b, r * RECORD)
                os.pwrite(f.fileno(), a, s * RECORD)
            damage([r, s])
        elif kind == "flip" and live:
            r = rng.choice(live)
            offset = r * RECORD + rng.randrange(RECORD)
            with open(path, "r+b") as f:
                os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, offset)[0] ^ (1 << rng.randrange(8))]), offset)
            damage([r])
        elif kind == "truncate" and size >= RECORD and rng.random() < 0.3:
            # Through a record's header at the latest: a cut that took only zero bytes would be undone when
            # the file grows again (the hole reads as zeros), and the header's length field is never zero.
            last = size // RECORD - 1
            cut = rng.randrange(max(last - 1, 0), last + 1) * RECORD + rng.randrange(25)
            os.truncate(path, cut)
            damage([r for r in live if (r + 1) * RECORD > cut])
        else:
            return
        done["damage: " + kind] += 1

    for step in range(12_000):
        if rng.random() < 0.05:
            outside_damage()
        if rng.random() < 0.15:
            faults.armed = [rng.choice(_FaultyWrites.KINDS)]
        failed_before = faults.failed
        kind = rng.choice(["allocate", "free", "write_block", "read_block", "device_slots", "evict", "prefetch",
                           "wait"]) if model else "allocate"
        ids: list[int] = []
        try:
            if kind == "allocate":
                n = rng.randint(1, 3)
                fits = n <= sum(capacity.values()) - len(model)
                try:
                    new = store.allocate(n)
                except PagedStoreFullError:
                    assert not fits
                    done["allocate: full"] += 1
                else:
                    assert fits
                    model.update((i, torch.zeros(BLOCK, dtype=torch.float16)) for i in new)
                    ids = new
            elif kind == "free":
                ids = some(2)
                store.free(ids)
                for i in ids:
                    del model[i]
                    damaged.discard(i)
                ids = []
            elif kind == "write_block":
                ids = some(1)
                value = _random_block(rng)
                store.write_block(ids[0], value)
                model[ids[0]] = value
                damaged.discard(ids[0])
            elif kind == "read_block":
                ids = some(1)
                assert _same(store.read_block(ids[0]), model[ids[0]])
            elif kind == "device_slots":
                ids = some(capacity["device"])
                slots = store.device_slots(ids).long()
                for slot, i in zip(slots.tolist(), ids):
                    assert _same(store.pool[slot], model[i])
            elif kind == "evict":
                ids, tier = some(3), rng.choice(["host", "disk"])
                where = collections.Counter(store.tier_of(i) for i in model)
                moving = [i for i in ids if rank(store.tier_of(i)) < rank(tier)]
                room = sum(capacity[t] - where[t] for t in order[rank(tier):])
                try:
                    store.evict(ids, tier)
                except PagedStoreFullError:
                    assert len(moving) > room
                    done["evict: full"] += 1
                else:
                    assert len(moving) <= room
                    assert all(rank(store.tier_of(i)) >= rank(tier) for i in ids)
            elif kind == "prefetch":
                ids = some(capacity["device"])
                handle = store.prefetch(ids)
                if rng.random() < 0.5:  # wait() later re-raises a read that failed meanwhile
                    handles.append((handle, ids, set(damaged)))  # and damage() adds to that set
                else:
                    handle.wait()
                    assert all(store.tier_of(i) == "device" for i in ids)
            elif kind == "wait" and handles:
                handle, ids, damaged_since = handles.pop(rng.randrange(len(handles)))
                handle.wait()
            done[kind] += 1
        except PagedStoreDiskError:
            assert faults.failed > failed_before, f"step {step}: {kind} raised without a failed write"
            done[kind + ": write failed"] += 1
        except CorruptBlockError as e:
            damage(faults.lost)  # a block of ``ids`` may have gone down to disk and up again in this call
            named = int(re.search(r"block (\d+) read from", str(e)).group(1))
            if kind == "wait":  # its transfers may hold other blocks, read before they were rewritten
                assert named in damaged_since | damaged, (step, str(e))
            else:  # prefetch's handle also waits for the transfers of other blocks
                assert named in damaged and (named in ids or kind == "prefetch"), (step, kind, str(e))
            done[kind + ": corrupt"] += 1
        else:
            assert faults.failed == failed_before, f"step {step}: {kind} hid a failed write"
        faults.armed.clear()
        faults.fail_next_pwrite = False
        done["blocks parked"] += store.stats()["parked"] > 0
        damage(faults.lost)
        faults.lost.clear()
        if step % 200 == 199:
            check_all()
    check_all()
    store.close()
    assert not path.exists()

    for kind in ("allocate", "free", "write_block", "read_block", "device_slots", "evict", "prefetch"):
        assert done[kind] > 500, (kind, done)
    for outcome in ("allocate: write failed", "write_block: write failed", "device_slots: write failed",
                    "evict: write failed", "prefetch: write failed", "read_block: corrupt", "device_slots: corrupt",
                    "prefetch: corrupt", "wait: corrupt", "blocks parked"):
        assert done[outcome] > 10, (outcome, done)
    for kind in ("swap", "stale", "flip", "truncate", "second opener"):
        assert done["damage: " + kind] > 10, (kind, done)
