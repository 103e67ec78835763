"""PagedTensor: a tiered store of fixed-shape blocks (device, pinned host, disk) for the paged ops.

:class:`PagedTensor` keeps fixed-shape blocks behind stable logical ids on up to three tiers:
device memory (``store.pool``, the pool the ops take), host memory (pinned when the device is an
accelerator, so copies can be asynchronous) and a file on disk. Its promise: nothing is lost. A
block moved to any tier and back has the same bytes; an operation either does what it says or
raises a documented error and changes no block's bytes.

* ``allocate(n)`` takes ids from a free list; a new block is all zeros, on the fastest tier with a
  free slot (allocating moves no other block). ``free(ids)`` gives them back.
* ``device_slots(ids)`` brings blocks to the device and returns their slots: the block table for
  ``paged_write`` / ``paged_gather`` on ``store.pool`` (or a view of it). Room is made by evicting
  the least recently used unpinned blocks: to the host, whose own least recently used blocks go to
  disk first when it is full. ``pin(ids)`` brings blocks to the device and keeps them there until
  ``unpin``; ``evict(ids, tier)`` moves blocks down explicitly.
* ``prefetch(ids)`` starts bringing blocks to the device and returns at once: disk reads run in a
  background thread, host-to-device copies on a side stream. Any later access to those blocks
  waits for them; ``handle.wait()`` waits explicitly and raises a failed read's error.
* ``freeze(ids)`` is the caller's promise that those blocks' bytes will not change again (weights,
  say). A frozen block brought up to the device from a lower tier keeps its copy there (the slot
  stays reserved as its clean copy), and moving it back down to that tier moves no bytes: its
  device slot is freed and the block is placed back at its copy (``stats()["dropped"]`` counts
  these per route; ``stats()["moved"]`` does not). The device's least recently used eviction sends
  such a block back to its copy wherever that is; an explicit ``evict`` to another tier is a normal
  move that releases the copy. ``write_block`` refuses a frozen block; ``unfreeze(ids)`` and
  ``free(ids)`` release the copies. A lower tier that needs room (for a block coming down or a new
  one) releases its kept copies, oldest first, before evicting any of its blocks: copies never
  cost capacity, and a block whose copy went is copied for real when it next goes down. Nothing is
  lost: a block with a kept copy is still whole on the device, and a kept disk record is still
  checked when read back.
* Every move between tiers goes through ``paged_copy_blocks`` (so a backend can accelerate it) or,
  for the disk, through the store's own file I/O; a prefetch of consecutive slots to consecutive
  slots is one ``Tensor.copy_`` (the copy engine's own transfer, see ``_copy_slots``).

The disk tier
-------------
``disk_path`` is the store's private scratch file. The store creates it, holds it locked
(``fcntl.flock``, exclusive) while open, and deletes it on :meth:`~PagedTensor.close`, at garbage
collection, or at the end of a ``with PagedTensor(...) as store:`` block. Its records are only
meaningful to the store that wrote them (their generations live in that store's memory), so:

* a path another store holds raises :class:`~apt_hal.errors.PagedStoreDiskError` ("in use");
* an existing file is never truncated or reused unless the caller passes ``overwrite=True`` (say,
  one left by a killed process); otherwise the constructor raises ``PagedStoreDiskError``.

The constructor reserves the whole file (``posix_fallocate``): a disk without room fails there,
naming the file and the errno reason, not later in an ``evict``. Writes and reads are explicit
(``pwritev``/``preadv`` of whole records, short writes finished or reported). A write that fails
raises ``PagedStoreDiskError`` (file, record, errno reason) and leaves every block where it was with
its bytes: a block is written into a free record, never over its current one (the file keeps one
spare record for rewriting blocks already on disk), and the store's books change only after the
write succeeded. One case keeps a block off its tiers: when every tier is full,
``device_slots``/``pin``/``prefetch`` park the blocks leaving the device in a device buffer while
the requested ones come up; if writing them down fails, they stay there (``tier_of`` says
"parked", ``stats()["parked"]`` counts them), readable, writable and movable as usual.

Each record is a 32-byte header, then the block's bytes: CRC-32 (of the rest of the header and the
bytes), block id, write generation (a store-wide counter; the store remembers the generation of each
record's last write), payload length. A read checks all of it and raises
:class:`~apt_hal.errors.CorruptBlockError` naming the block, the file, the record and what did not
match: a record cut short (the file was truncated), a CRC mismatch (changed bytes), another block's
id (records swapped or misplaced), an older generation (a stale record: a write was lost). A failed
read changes nothing: the block stays on disk.

Why CRC-32 (``zlib.crc32``) rather than a cryptographic hash such as BLAKE2b: the threat is
accidental corruption, not an adversary. CRC-32 detects every error burst of up to 32 bits (so any
flipped byte) with certainty and other damage with probability 1 - 2**-32, and it is faster.

Thread safety: a store is not thread-safe; call it from one thread at a time. Its own background
prefetch is synchronised internally: the worker changes no bookkeeping, it only reads file records
and writes device slots reserved for it, and every method waits for the prefetches of the blocks
it touches (a method that must evict first waits for all of them).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import errno
import fcntl
import itertools
import math
import os
import struct
import weakref
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

import torch

from apt_hal import checks
from apt_hal.contracts.paged_tensor import paged_copy_blocks
from apt_hal.device import synchronize
from apt_hal.errors import CorruptBlockError, PagedStoreDiskError, PagedStoreFullError

_STORE = "PagedTensor"


@dataclasses.dataclass(eq=False)
class _Tier:
    name: str
    pool: Optional[torch.Tensor]  # [capacity, *block_shape]; None for the disk tier
    capacity: int
    free: list[int] = dataclasses.field(init=False)  # free slots (those of transfers in flight are in neither list)
    blocks: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    # ^ block id -> slot, least recently used first
    copies: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    # ^ frozen block id (on the device now) -> the slot keeping its clean copy here, oldest first

    def __post_init__(self):
        self.free = list(range(self.capacity))[::-1]  # pop() hands out slot 0 first


@dataclasses.dataclass(eq=False)
class _Transfer:
    """Blocks on their way to the device. Their source slots stay reserved until it settles."""

    ids: list[int]
    source: _Tier
    source_slots: list[int]
    future: Future  # result: (event marking the copy's end or None, staging kept alive until then)
    settled: bool = False
    error: Optional[BaseException] = None

    def arrived(self) -> bool:
        if self.settled:
            return True
        if not self.future.done():
            return False
        if self.future.exception() is not None:
            return True
        event = self.future.result()[0]
        return event is None or event.query()


def _consecutive(slots: list[int]) -> Optional[slice]:
    """``slice(a, a + n)`` when ``slots`` are ``a, a + 1, ..., a + n - 1``, else None."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


def _reason(e: OSError) -> str:
    return f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"


def _release_file(fd: int, path: str, identity: tuple) -> None:
    """Delete the store's file (unless something else now has its name) and close it, which drops the lock."""
    try:
        here = os.stat(path)
        if (here.st_dev, here.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


class _DiskFile:
    """The disk tier: fixed-size records in one file that this store holds locked; see the module docstring."""

    HEADER = struct.Struct("<I4xQQQ")  # CRC-32, block id, write generation, payload bytes

    def __init__(self, path: str, num_records: int, payload_bytes: int, overwrite: bool):
        self.path, self.payload_bytes = path, payload_bytes
        self.record_bytes = self.HEADER.size + payload_bytes
        self.fd = self._open_locked(overwrite)
        stat = os.fstat(self.fd)
        self._release = weakref.finalize(self, _release_file, self.fd, path, (stat.st_dev, stat.st_ino))
        size = num_records * self.record_bytes
        try:
            os.ftruncate(self.fd, 0)  # an overwritten file's old records must not survive
            os.posix_fallocate(self.fd, 0, size)  # a full disk fails here, not in the middle of an evict
        except OSError as e:
            self.close()
            raise PagedStoreDiskError(f"apt_hal.{_STORE}: cannot reserve {size} bytes for the disk tier "
                                      f"({num_records} records) in {path}: {_reason(e)}", e.errno, path) from e
        self.generation = [0] * num_records  # per record, the generation its last write got; 0: never written
        self._writes = 0

    def _open_locked(self, overwrite: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if overwrite else os.O_EXCL)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError as e:
            if self._locked_by_another():
                raise self._in_use() from e
            raise PagedStoreDiskError(
                f"apt_hal.{_STORE}: argument 'disk_path' names an existing file, {self.path}; a store never reuses "
                f"a file unless asked: pass overwrite=True to discard its contents, or choose another path",
                e.errno, self.path) from e
        except OSError as e:
            raise PagedStoreDiskError(f"apt_hal.{_STORE}: cannot open the disk tier's file {self.path}: "
                                      f"{_reason(e)}", e.errno, self.path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The name may have been deleted and made again between our open and our lock.
            locked_name_is_ours = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except (BlockingIOError, FileNotFoundError):
            locked_name_is_ours = False
        except BaseException:
            os.close(fd)
            raise
        if not locked_name_is_ours:
            os.close(fd)
            raise self._in_use()
        return fd

    def _locked_by_another(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _in_use(self) -> PagedStoreDiskError:
        return PagedStoreDiskError(f"apt_hal.{_STORE}: the disk tier's file {self.path} is in use by another "
                                   f"PagedTensor (it holds the file's lock); give each store its own disk_path",
                                   errno.EBUSY, self.path)

    def write(self, block_ids: list[int], records: list[int], rows) -> None:
        """Write one record per block: a header binding it to its block and a new generation, then its bytes."""
        for block_id, record, row in zip(block_ids, records, rows):
            self._writes += 1
            fields = self.HEADER.pack(0, block_id, self._writes, self.payload_bytes)[4:]
            header = struct.pack("<I", zlib.crc32(row, zlib.crc32(fields))) + fields
            self._write_all(header, row, block_id, record)
            self.generation[record] = self._writes

    def _write_all(self, header: bytes, row, block_id: int, record: int) -> None:
        offset, done = record * self.record_bytes, 0
        try:
            done = os.pwritev(self.fd, [header, row], offset)
            if done < self.record_bytes:  # a short write: finish it, or learn why it cannot be finished
                rest = memoryview(header + row.tobytes())
                while done < self.record_bytes:
                    written = os.pwrite(self.fd, rest[done:], offset + done)
                    if written == 0:
                        raise OSError(errno.EIO, "the file accepted no more bytes")
                    done += written
        except OSError as e:
            raise PagedStoreDiskError(
                f"apt_hal.{_STORE}: writing block {block_id} to {self.path} (record {record}) failed after {done} "
                f"of {self.record_bytes} bytes: {_reason(e)}; the block keeps its previous place and bytes",
                e.errno, self.path) from e

    def read(self, block_ids: list[int], records: list[int]) -> torch.Tensor:
        """The blocks' bytes, [len(records), payload_bytes] uint8, each record checked whole."""
        out = torch.empty((len(records), self.payload_bytes), dtype=torch.uint8)
        header = bytearray(self.HEADER.size)
        for block_id, record, row in zip(block_ids, records, out.numpy()):
            try:
                got = os.preadv(self.fd, [header, row], record * self.record_bytes)
            except OSError as e:
                raise PagedStoreDiskError(f"apt_hal.{_STORE}: reading block {block_id} from {self.path} "
                                          f"(record {record}) failed: {_reason(e)}", e.errno, self.path) from e
            problem = self._mismatch(got, header, row, block_id, record)
            if problem:
                raise CorruptBlockError(f"apt_hal.{_STORE}: block {block_id} read from {self.path} "
                                        f"(record {record}) {problem}")
        return out

    def _mismatch(self, got: int, header: bytearray, row, block_id: int, record: int) -> Optional[str]:
        """What is wrong with a record read for ``block_id``, or None."""
        if got < self.record_bytes:  # pread of a regular file is short only at its end
            return f"is cut short: the file holds {got} of its {self.record_bytes} bytes (it was truncated)"
        crc, stored_id, generation, length = self.HEADER.unpack(header)
        if zlib.crc32(row, zlib.crc32(memoryview(header)[4:])) != crc:
            return "does not match its CRC-32: the file was changed or the disk is failing"
        if stored_id != block_id:
            return f"holds the record of block {stored_id}: records were swapped or misplaced"
        if generation != self.generation[record]:
            return (f"holds write generation {generation}, expected {self.generation[record]}: a stale record "
                    f"(a write to the file was lost)")
        if length != self.payload_bytes:
            return f"holds {length} payload bytes, expected {self.payload_bytes}"
        return None

    def close(self) -> None:
        """Delete the file and release its lock (idempotent; also runs when the store is garbage collected)."""
        self._release()


class PrefetchHandle:
    """What :meth:`PagedTensor.prefetch` returns: ``done()`` polls, ``wait()`` blocks."""

    def __init__(self, store: "PagedTensor", transfers: list[_Transfer]):
        self._store, self._transfers = store, transfers

    def done(self) -> bool:
        """Whether every block has arrived (``wait()`` would not block)."""
        return all(t.arrived() for t in self._transfers)

    def wait(self) -> None:
        """Block until the blocks are on the device; re-raise the error of a failed read."""
        self._store._settle(self._transfers)
        for t in self._transfers:
            if t.error is not None:
                raise t.error


class PagedTensor:
    """A pool of fixed-shape blocks on device, host and disk tiers; see the module docstring."""

    def __init__(self, block_shape: Iterable[int], dtype: torch.dtype, device: Union[str, torch.device],
                 num_device_blocks: int, num_host_blocks: int = 0, disk_path: Optional[str] = None,
                 num_disk_blocks: int = 0, *, overwrite: bool = False):
        block_shape = tuple(block_shape)
        if not block_shape or not all(isinstance(d, int) and d > 0 for d in block_shape):
            checks.fail(_STORE, f"argument 'block_shape' must be a non-empty tuple of positive ints, got {block_shape}")
        if not isinstance(dtype, torch.dtype):
            checks.fail(_STORE, f"argument 'dtype' must be a torch.dtype, got {dtype!r}")
        for name, n, low in (("num_device_blocks", num_device_blocks, 1), ("num_host_blocks", num_host_blocks, 0),
                             ("num_disk_blocks", num_disk_blocks, 0)):
            if not isinstance(n, int) or n < low:
                checks.fail(_STORE, f"argument '{name}' must be an int >= {low}, got {n!r}")
        if (disk_path is None) != (num_disk_blocks == 0):
            checks.fail(_STORE, "arguments 'disk_path' and 'num_disk_blocks' go together: give both or neither, "
                                f"got disk_path={disk_path!r}, num_disk_blocks={num_disk_blocks}")
        if not isinstance(overwrite, bool):
            checks.fail(_STORE, f"argument 'overwrite' must be a bool, got {overwrite!r}")
        self.block_shape, self.dtype = block_shape, dtype
        self.disk_path = os.fspath(disk_path) if disk_path is not None else None
        self.pool = torch.empty((num_device_blocks, *block_shape), dtype=dtype, device=device)
        self.device = self.pool.device
        accelerator = self.device.type != "cpu"
        self._device_tier = _Tier("device", self.pool, num_device_blocks)
        self._tiers = [self._device_tier]
        if num_host_blocks:
            host_pool = torch.empty((num_host_blocks, *block_shape), dtype=dtype, pin_memory=accelerator)
            self._tiers.append(_Tier("host", host_pool, num_host_blocks))
        self._disk: Optional[_DiskFile] = None
        if num_disk_blocks:
            # One record more than the tier holds: a block on disk is rewritten into a free record, so a
            # failed write leaves its old record whole.
            self._disk = _DiskFile(self.disk_path, num_disk_blocks + 1, math.prod(block_shape) * dtype.itemsize,
                                   overwrite)
            self._spare_record = num_disk_blocks
            self._tiers.append(_Tier("disk", None, num_disk_blocks))
        self._stranded: list[_Tier] = []  # parked buffers whose blocks a failed disk write left on the device
        self._free_ids = list(range(sum(t.capacity for t in self._tiers)))[::-1]
        self._where: dict[int, _Tier] = {}  # allocated block id -> its tier
        self._pins: collections.Counter = collections.Counter()
        self._pending: dict[int, _Transfer] = {}  # block id -> its prefetch in flight
        self._moved: collections.Counter = collections.Counter()  # (from, to) -> blocks moved
        self._dropped: collections.Counter = collections.Counter()  # (from, to) -> blocks put back at their copy
        self._frozen: set[int] = set()  # blocks whose bytes the caller promised not to change
        self._worker: Optional[ThreadPoolExecutor] = None
        self._stream = None
        if accelerator:
            try:
                self._stream = torch.Stream(device=self.device)
            except RuntimeError:  # a device without streams: host-to-device prefetch copies synchronously
                pass

    # ---- public API -----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """``n`` new block ids; each block is all zeros, on the fastest tier with a free slot."""
        if not isinstance(n, int) or n < 0:
            checks.fail(f"{_STORE}.allocate", f"argument 'n' must be an int >= 0, got {n!r}")
        if n > len(self._free_ids):
            raise PagedStoreFullError(f"apt_hal.{_STORE}.allocate: asked for {n} blocks but only "
                                      f"{len(self._free_ids)} of {len(self._free_ids) + len(self._where)} are free")
        if sum(len(t.free) for t in self._tiers) < n:
            self._settle(list(self._pending.values()))  # prefetches in flight hold their source slots
        for tier in self._tiers[1:]:  # kept copies give way to new blocks
            self._release_copies(tier, n - sum(len(t.free) for t in self._tiers))
        ids = [self._free_ids.pop() for _ in range(n)]
        for i in ids:
            tier = next(t for t in self._tiers if t.free)
            self._place([i], tier, [tier.free.pop()])
        try:
            for tier, group in self._by_tier(ids).items():
                zeros = torch.zeros((len(group), *self.block_shape), dtype=self.dtype,
                                    device=tier.pool.device if tier.pool is not None else "cpu")
                self._store(tier, group, [tier.blocks[i] for i in group], zeros)
        except PagedStoreDiskError:
            self.free(ids)
            raise
        return ids

    def free(self, ids: Iterable[int]) -> None:
        """Give blocks back (they must not be pinned); their ids may be allocated again."""
        ids = self._ids("free", ids)
        pinned = [i for i in ids if self._pins[i]]
        if pinned:
            checks.fail(f"{_STORE}.free", f"argument 'ids' names pinned block {pinned[0]}; unpin it first")
        self._settle_ids(ids)  # a failed read does not matter: the block is being dropped
        for i in ids:
            self._release_copy(i)
            self._frozen.discard(i)
            tier = self._where.pop(i)
            tier.free.append(tier.blocks.pop(i))
        self._free_ids.extend(reversed(ids))

    def write_block(self, id: int, value: torch.Tensor) -> None:
        """Overwrite block ``id`` with ``value`` (block_shape, the store's dtype, any device), in place.

        A frozen block cannot be written (:meth:`unfreeze` it first).
        """
        self._ids("write_block", [id])
        if id in self._frozen:
            checks.fail(f"{_STORE}.write_block", f"argument 'id' names block {id}, which is frozen: its bytes cannot "
                                                 f"change (unfreeze it first)")
        checks.tensor(f"{_STORE}.write_block", "value", value, dtypes=(self.dtype,))
        if tuple(value.shape) != self.block_shape:
            checks.fail(f"{_STORE}.write_block", f"argument 'value' must have shape {list(self.block_shape)}, "
                                                 f"got {list(value.shape)}")
        self._settle_ids([id])
        tier = self._where[id]
        if tier.pool is None:  # into the spare record, then swap: a failed write leaves the old record whole
            self._store(tier, [id], [self._spare_record], value.unsqueeze(0))
            tier.blocks[id], self._spare_record = self._spare_record, tier.blocks[id]
        else:
            self._store(tier, [id], [tier.blocks[id]], value.contiguous().unsqueeze(0))
        self._touch([id])

    def read_block(self, id: int) -> torch.Tensor:
        """A copy of block ``id`` on the CPU, read where the block is (a disk read checks its record)."""
        self._ids("read_block", [id])
        self._settle_ids([id])
        tier = self._where[id]
        if tier.pool is None:
            block = self._disk_read([id], [tier.blocks[id]])[0]
        else:
            block = self._to_cpu(self._load(tier, [tier.blocks[id]]))[0]
        self._touch([id])
        return block

    def device_slots(self, ids: Iterable[int]) -> torch.Tensor:
        """The blocks' device slots (int32, on the device), bringing them there first.

        Pass them as the block table of ``paged_write`` / ``paged_gather`` on ``store.pool``. They
        stay valid until the next call that may evict; pin the blocks to keep them longer. ``ids``
        may repeat a block. Frozen blocks must not be written through the pool: the store cannot
        see such writes, and a block's kept copy on a lower tier would no longer match it.
        """
        ids = self._ids("device_slots", ids, unique=False)
        return torch.tensor(self._slots_on_device(ids), dtype=torch.int32, device=self.device)

    def device_slot(self, id: int) -> int:
        """Block ``id``'s device slot as a Python int, bringing it there first: :meth:`device_slots`
        for one block, without a device tensor (reading one back would wait for the device's queue)."""
        return self._slots_on_device(self._ids("device_slot", [id]))[0]

    def _slots_on_device(self, ids: list[int]) -> list[int]:
        self._settle_ids(ids)
        self._bring_to_device(ids)
        self._touch(ids)
        return [self._device_tier.blocks[i] for i in ids]

    def pin(self, ids: Iterable[int]) -> None:
        """Bring blocks to the device and keep them there until unpinned (pins nest)."""
        ids = self._ids("pin", ids)
        self._settle_ids(ids)
        self._bring_to_device(ids)
        self._touch(ids)
        self._pins.update(ids)

    def unpin(self, ids: Iterable[int]) -> None:
        """Undo one :meth:`pin` of each block."""
        ids = self._ids("unpin", ids)
        for i in ids:
            if not self._pins[i]:
                checks.fail(f"{_STORE}.unpin", f"argument 'ids' names block {i}, which is not pinned")
        self._pins.subtract(ids)

    def freeze(self, ids: Iterable[int]) -> None:
        """Promise that these blocks' bytes will not change again (idempotent; see the module docstring).

        From now on a frozen block brought to the device keeps its copy on the lower tier it came
        from, and going back to that tier moves no bytes. ``write_block`` refuses it, and it must
        not be written through ``store.pool`` either, until :meth:`unfreeze`.
        """
        ids = self._ids("freeze", ids)
        self._settle_ids(ids)  # a copy is kept only for transfers that start once the block is frozen
        self._frozen.update(ids)

    def unfreeze(self, ids: Iterable[int]) -> None:
        """Undo :meth:`freeze` (idempotent): release the blocks' kept copies; they may be written again."""
        ids = self._ids("unfreeze", ids)
        self._settle_ids(ids)
        for i in ids:
            self._release_copy(i)
            self._frozen.discard(i)

    def evict(self, ids: Iterable[int], tier: str = "host") -> None:
        """Move blocks down to ``tier`` ("host" or "disk"); blocks already there or lower stay.

        A frozen block whose copy ``tier`` keeps is put back at it without moving bytes; one whose
        copy is on another tier moves normally, and that copy is released.
        """
        ids = self._ids("evict", ids)
        names = [t.name for t in self._tiers[1:]]
        if tier not in names:
            checks.fail(f"{_STORE}.evict", f"argument 'tier' must be a lower tier of this store "
                                           f"({', '.join(map(repr, names)) or 'it has none'}), got {tier!r}")
        pinned = [i for i in ids if self._pins[i]]
        if pinned:
            checks.fail(f"{_STORE}.evict", f"argument 'ids' names pinned block {pinned[0]}, which cannot be evicted")
        self._settle_ids(ids)
        dst = self._tiers[1 + names.index(tier)]
        self._move([i for i in ids if self._rank(self._where[i]) < self._rank(dst)], dst)

    def prefetch(self, ids: Iterable[int]) -> PrefetchHandle:
        """Start bringing blocks to the device and return at once.

        Disk reads run in a background thread and host-to-device copies on a side stream (where the
        device has streams). When every tier is full the move needs the slots the blocks leave, so it
        completes before this returns.
        """
        ids = self._ids("prefetch", ids, unique=False)
        transfers = self._bring_to_device(ids, background=True)
        transfers += [t for t in self._transfers_of(ids) if t not in transfers]
        self._touch(ids)
        return PrefetchHandle(self, transfers)

    def tier_of(self, id: int) -> str:
        """The tier block ``id`` is on: "device", "host", "disk" or, after a failed disk write,
        "parked" (see the module docstring); waits for a prefetch of it."""
        self._ids("tier_of", [id])
        self._settle_ids([id])
        return self._where[id].name

    def stats(self) -> dict:
        """Blocks per tier (capacity, used, free; a lower tier also "kept": slots keeping frozen blocks'
        copies), parked, pinned, frozen and in-flight counts, and per route ("device->host"): blocks
        ``moved`` (bytes copied) and blocks ``dropped`` (put back at their kept copy, no bytes copied)."""
        out: dict = {t.name: {"capacity": t.capacity, "used": len(t.blocks), "free": len(t.free)}
                     for t in self._tiers}
        for t in self._tiers[1:]:
            out[t.name]["kept"] = len(t.copies)
        out.update(allocated=len(self._where), parked=sum(len(t.blocks) for t in self._stranded),
                   pinned=sum(1 for n in self._pins.values() if n > 0), frozen=len(self._frozen),
                   in_flight=len(self._pending), moved={f"{a}->{b}": n for (a, b), n in self._moved.items()},
                   dropped={f"{a}->{b}": n for (a, b), n in self._dropped.items()})
        return out

    def close(self) -> None:
        """Wait for prefetches, stop the background thread, delete the disk file and release its lock.

        Idempotent. Garbage collection releases the file too; ``with PagedTensor(...) as store:``
        closes the store at the end of the block.
        """
        self._settle(list(self._pending.values()))
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> "PagedTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- placement ------------------------------------------------------------------------

    def _ids(self, method: str, ids, unique: bool = True) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        if not isinstance(ids, Iterable):
            checks.fail(f"{_STORE}.{method}", f"argument 'ids' must be a sequence of block ids, got {ids!r}")
        ids = list(ids)
        for i in ids:
            if i not in self._where:
                checks.fail(f"{_STORE}.{method}", f"argument 'ids' names block {i!r}, which is not allocated")
        if unique and len(set(ids)) != len(ids):
            checks.fail(f"{_STORE}.{method}", "argument 'ids' names one block more than once")
        return ids

    def _place(self, ids: list[int], tier: _Tier, slots: list[int]) -> None:
        for i, s in zip(ids, slots):
            tier.blocks[i] = s
            self._where[i] = tier

    def _rank(self, tier: _Tier) -> int:
        """How far down ``tier`` is; a parked buffer is device memory."""
        return self._tiers.index(tier) if tier in self._tiers else 0

    def _touch(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._where[i].blocks.move_to_end(i)

    def _by_tier(self, ids: list[int]) -> dict:
        groups: dict = {}
        for i in ids:
            groups.setdefault(self._where[i], []).append(i)
        return groups

    def _below(self, tier: _Tier, n: int) -> _Tier:
        """The next tier down, for blocks that ``n`` blocks bound for ``tier`` push out of it."""
        k = self._tiers.index(tier) + 1
        if k == len(self._tiers):
            raise PagedStoreFullError(f"apt_hal.{_STORE}: the {tier.name} tier ({tier.capacity} blocks, "
                                      f"{len(tier.free)} free) cannot take {n} more blocks and no tier is below it")
        return self._tiers[k]

    def _victims(self, tier: _Tier, n: int, keep: set) -> list[int]:
        """The ``n`` least recently used blocks of ``tier`` that may leave it. Blocks in ``keep`` (those
        this call brings to the device) never leave the device, and leave a lower tier last."""
        others = (i for i in tier.blocks if i not in keep and not self._pins[i])
        kept = (i for i in tier.blocks if i in keep) if tier is not self._device_tier else ()
        found = list(itertools.islice(itertools.chain(others, kept), n))
        if len(found) < n:
            raise PagedStoreFullError(
                f"apt_hal.{_STORE}: the {tier.name} tier needs {n} more free blocks but can evict only {len(found)}: "
                f"{sum(1 for i in tier.blocks if self._pins[i])} of its {tier.capacity} blocks are pinned and this "
                f"call needs {len(keep)} there")
        return found

    def _claim(self, tier: _Tier, n: int, keep: set = frozenset()) -> list[int]:
        """Take ``n`` free slots of ``tier``, first releasing the copies it keeps (oldest first), then
        evicting its least recently used blocks if needed (a frozen one goes back to its kept copy)."""
        if n > len(tier.free) and self._pending:
            self._settle(list(self._pending.values()))  # blocks in flight hold slots and cannot move yet
        self._release_copies(tier, n - len(tier.free))
        short = n - len(tier.free)
        if short > 0:
            below = self._below(tier, n)
            rest = self._drop(self._victims(tier, short, keep))
            if rest:
                self._move(rest, below, keep)
        return sorted(tier.free.pop() for _ in range(n))  # ascending: runs of slots copy as one piece

    def _release_copies(self, tier: _Tier, n: int) -> None:
        """Free up to ``n`` slots of ``tier`` that keep copies, oldest first (their blocks stay whole on the device)."""
        for _ in range(max(0, min(n, len(tier.copies)))):
            tier.free.append(tier.copies.popitem(last=False)[1])

    def _copy_tier(self, id: int) -> Optional[_Tier]:
        """The lower tier keeping a clean copy of block ``id`` (then on the device), or None."""
        return next((t for t in self._tiers[1:] if id in t.copies), None)

    def _release_copy(self, id: int) -> None:
        tier = self._copy_tier(id)
        if tier is not None:
            tier.free.append(tier.copies.pop(id))

    def _drop(self, ids: list[int], only: Optional[_Tier] = None) -> list[int]:
        """Put the blocks of ``ids`` that have a kept copy (on ``only``, if given) back at it, moving
        no bytes: their device slots are freed. Returns the others."""
        rest = []
        for i in ids:
            home = self._copy_tier(i)
            if home is None or (only is not None and home is not only):
                rest.append(i)
                continue
            here = self._where[i]
            here.free.append(here.blocks.pop(i))
            self._place([i], home, [home.copies.pop(i)])
            self._dropped[here.name, home.name] += 1
        return rest

    def _move(self, ids: list[int], dst: _Tier, keep: set = frozenset(), background: bool = False,
              loaded: Optional[dict] = None) -> list[_Transfer]:
        """Move blocks to ``dst``. Going down, blocks that ``dst`` cannot hold go further down: the
        first ones (callers list the least recently used first). With ``background``, copies from
        disk (and from host, on a side stream) are only started; the returned transfers finish them.
        A frozen block coming up keeps its source slot as its copy; one going down to its copy's
        tier is put back there without copying, and one going down elsewhere releases its copy.
        """
        if dst in self._tiers[1:]:
            ids = self._drop(ids, only=dst)
        overflow = len(ids) - dst.capacity
        if overflow > 0:
            self._move(ids[:overflow], self._below(dst, len(ids)), keep)
            ids = ids[overflow:]
        if loaded is None:  # reading the disk is the step that can fail (a corrupt record): do it first
            loaded = {} if background else self._read_from_disk(ids)
        slots = dict(zip(ids, self._claim(dst, len(ids), keep)))
        transfers = []
        try:
            for src, group in self._by_tier(ids).items():  # grouped after the claim: it may have moved some
                src_slots, dst_slots = [src.blocks[i] for i in group], [slots[i] for i in group]
                in_flight = background and (src.pool is None or self._stream is not None)
                if in_flight:
                    transfers.append(self._start(group, src, src_slots, dst_slots))
                elif src.pool is None:
                    loaded.update(self._read_from_disk([i for i in group if i not in loaded]))
                    self._store(dst, group, dst_slots, torch.stack([loaded[i] for i in group]))
                elif dst.pool is not None:
                    self._copy_slots(src.pool, src_slots, dst.pool, dst_slots)
                else:
                    self._store(dst, group, dst_slots, self._load(src, src_slots))
                for i in group:
                    del src.blocks[i]
                    if dst in self._tiers[1:]:
                        self._release_copy(i)  # the block is whole at dst now
                self._place(group, dst, dst_slots)
                self._moved[src.name, dst.name] += len(group)
                if not in_flight:  # a transfer in flight releases them when it settles
                    keeps_copy = dst is self._device_tier and src in self._tiers[1:]
                    self._release_source(group, src, src_slots, keeps_copy)
        finally:
            dst.free.extend(s for i, s in slots.items() if self._where[i] is not dst)  # after a failed read
        return transfers

    def _read_from_disk(self, ids: list[int]) -> dict:
        """{id: block} for the blocks of ``ids`` that are on disk, read and checked."""
        on_disk = [i for i in ids if self._where[i].pool is None]
        if not on_disk:
            return {}
        disk = self._where[on_disk[0]]
        return dict(zip(on_disk, self._disk_read(on_disk, [disk.blocks[i] for i in on_disk])))

    def _bring_to_device(self, ids: list[int], background: bool = False) -> list[_Transfer]:
        dev = self._device_tier
        if len(set(ids)) > dev.capacity:
            raise PagedStoreFullError(f"apt_hal.{_STORE}: {len(set(ids))} blocks are needed on the device at once "
                                      f"but its tier holds {dev.capacity}")
        if self._pending and sum(self._where[i] is not dev for i in set(ids)) > len(dev.free):
            self._settle(list(self._pending.values()))  # before evicting (see _claim)
        missing = [i for i in dict.fromkeys(ids) if self._where[i] is not dev]
        if not missing:
            return []
        short = len(missing) - len(dev.free)
        if short > sum(len(t.free) + len(t.copies) for t in self._tiers[1:]):  # a kept copy's slot is room
            # Every tier is full: the victims need the slots the missing blocks leave. Park them in
            # a device buffer while the missing blocks come up, then put them down.
            victims = self._victims(dev, short, set(ids))
            loaded = self._read_from_disk(missing)  # before any move, so that a corrupt record changes nothing
            parked = _Tier("parked", self.pool.new_empty((short, *self.block_shape)), short)
            self._move(victims, parked)
            self._move(missing, dev, loaded=loaded)
            try:
                self._move(self._drop(list(parked.blocks)), self._tiers[1])
            finally:
                if parked.blocks:  # a disk write failed: those blocks wait here, readable, until moved
                    self._stranded = [t for t in self._stranded if t.blocks] + [parked]
            return []
        return self._move(missing, dev, set(ids), background)

    # ---- prefetch -------------------------------------------------------------------------

    def _start(self, ids: list[int], src: _Tier, src_slots: list[int], dst_slots: list[int]) -> _Transfer:
        ready = torch.accelerator.current_stream(self.device).record_event() if self._stream else None
        if src.pool is None:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="apt_hal-paged-prefetch")
            # The worker runs in a copy of this context, so the caller's apt_hal.use(...) applies there.
            future = self._worker.submit(contextvars.copy_context().run, self._read_in_background,
                                         ids, src_slots, dst_slots, ready)
        else:
            future = Future()
            future.set_result((self._copy_on_side_stream(src.pool, src_slots, dst_slots, ready), None))
        transfer = _Transfer(ids, src, src_slots, future)
        self._pending.update(dict.fromkeys(ids, transfer))
        return transfer

    def _read_in_background(self, ids, disk_slots, dst_slots, ready):
        blocks = self._disk_read(ids, disk_slots)
        if self._stream is not None:
            blocks = blocks.pin_memory()
        return self._copy_on_side_stream(blocks, range(len(ids)), dst_slots, ready), blocks

    def _copy_on_side_stream(self, src: torch.Tensor, src_slots, dst_slots, ready):
        if self._stream is None:
            self._copy_slots(src, src_slots, self.pool, dst_slots)
            return None
        with self._stream:
            self._stream.wait_event(ready)  # the caller's stream may still be reading the slots out
            self._copy_slots(src, src_slots, self.pool, dst_slots)
            return self._stream.record_event()

    def _copy_slots(self, src: torch.Tensor, src_slots, dst: torch.Tensor, dst_slots) -> None:
        """``dst[dst_slots] = src[src_slots]`` between two memory tiers, on the current stream; a copy
        to the host has landed when this returns. Consecutive slots on both sides (a streamed layer,
        a disk read) are one ``Tensor.copy_``: the copy engine moves the bytes straight into the
        slots. Through ``paged_copy_blocks`` they would first need index tensors on the device
        (uploading a Python list waits for the stream, so the host would stall until the previous
        prefetch landed) and a staging buffer that a kernel then scatters."""
        src_slots, dst_slots = list(src_slots), list(dst_slots)
        a, b = _consecutive(src_slots), _consecutive(dst_slots)
        if a is not None and b is not None:
            dst[b].copy_(src[a], non_blocking=dst.device.type != "cpu")
        else:
            paged_copy_blocks(src, self._index(src_slots, src), dst, self._index(dst_slots, dst))

    def _settle(self, transfers: Iterable[_Transfer]) -> None:
        """Finish transfers: release their source slots, or, for a failed read, put the blocks back."""
        for t in transfers:
            if t.settled:
                continue
            t.settled = True
            for i in t.ids:
                del self._pending[i]
            try:
                event = t.future.result()[0]
            except Exception as e:  # the bytes are still in the source slots: nothing is lost
                t.error = e
                for i, slot in zip(t.ids, t.source_slots):
                    self._device_tier.free.append(self._device_tier.blocks.pop(i))
                    self._place([i], t.source, [slot])
                continue
            if event is not None:
                torch.accelerator.current_stream(self.device).wait_event(event)
            self._release_source(t.ids, t.source, t.source_slots, keeps_copy=True)

    def _release_source(self, ids: list[int], src: _Tier, slots: list[int], keeps_copy: bool) -> None:
        """Free the slots blocks left on ``src``; with ``keeps_copy``, a frozen block's slot becomes its copy."""
        for i, slot in zip(ids, slots):
            if keeps_copy and i in self._frozen:
                src.copies[i] = slot
            else:
                src.free.append(slot)

    def _transfers_of(self, ids: Iterable[int]) -> list[_Transfer]:
        return list(dict.fromkeys(self._pending[i] for i in ids if i in self._pending))

    def _settle_ids(self, ids: Iterable[int]) -> None:
        self._settle(self._transfers_of(ids))

    # ---- bytes ----------------------------------------------------------------------------

    def _index(self, slots, pool: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(list(slots), dtype=torch.int64, device=pool.device)

    def _load(self, tier: _Tier, slots: list[int]) -> torch.Tensor:
        """The blocks in ``slots`` of a memory tier, as a new tensor on its device."""
        out = tier.pool.new_empty((len(slots), *self.block_shape))
        if tier.pool.device != self.device:
            synchronize(self.device)  # the CPU reads host memory that queued copies may still write
        paged_copy_blocks(tier.pool, self._index(slots, tier.pool), out, self._index(range(len(slots)), out))
        return out

    def _store(self, tier: _Tier, ids: list[int], slots: list[int], blocks: torch.Tensor) -> None:
        """Write ``blocks`` (those of ``ids``) into ``slots`` of ``tier``."""
        if tier.pool is None:
            rows = self._to_cpu(blocks).contiguous().reshape(len(slots), -1).view(torch.uint8).numpy()
            return self._disk.write(ids, slots, rows)
        if tier.pool.device != self.device and blocks.device.type == "cpu":
            synchronize(self.device)  # the CPU overwrites host memory that queued copies may still read
        paged_copy_blocks(blocks, self._index(range(len(slots)), blocks), tier.pool, self._index(slots, tier.pool))

    def _to_cpu(self, blocks: torch.Tensor) -> torch.Tensor:
        if blocks.device.type == "cpu":
            return blocks
        out = torch.empty(blocks.shape, dtype=blocks.dtype)
        every = range(len(blocks))
        paged_copy_blocks(blocks, self._index(every, blocks), out, self._index(every, out))
        synchronize(self.device)
        return out

    def _disk_read(self, ids: list[int], slots: list[int]) -> torch.Tensor:
        return self._disk.read(ids, slots).view(self.dtype).reshape(len(slots), *self.block_shape)
