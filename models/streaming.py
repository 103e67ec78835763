"""Weight streaming: run a model whose layers do not all fit the device, through the paged store.

    from apt_hal.models.streaming import stream_weights
    stream = stream_weights(model, "25%", device="cuda")   # or bytes: 2 * 2**30, "1.5GiB", "800MB"
    new_tokens = generate(model, prompts, config)          # unchanged
    print(stream.stats())                                  # accesses, hits, bytes streamed, store counters

Every decoder layer's weights (its parameters and buffers: bf16, or MXFP4 codes and scales) are
packed into one block of a :class:`apt_hal.paged_store.PagedTensor` whose device tier holds as
many layers as the budget allows. Everything else (embeddings, final norm, LM head) and the KV
cache stay on the device and count against the budget first.

When every layer fits, the layers' tensors are bound once to their device slots (pinned there);
no hooks run, nothing moves, and decode steps replay as device graphs like an unstreamed model's
(:attr:`WeightStream.moves_weights` is False).

Otherwise the layer blocks are frozen (:meth:`PagedTensor.freeze`: weights never change) and each
has a home below the device that keeps its bytes: the host tier (pinned on an accelerator) holds
every layer, or, with ``host_memory``, as many as that allows and a file at ``disk_path`` the
others. Bringing a layer up copies it host-to-device (or reads it from disk) and keeps its home
copy; evicting it back home frees its device slot and copies nothing (the store counts it in
``stats()["dropped"]``). So a step moves only host-to-device (and disk) bytes, one copy per
streamed layer, and no device-to-host bytes (the first eviction of a layer first placed on the
device happens at construction).

The device slots are split in two: the first layers stay resident (pinned in the store, never
evicted) and the others stream, in layer order, through a window of ``prefetch_depth + 1`` slots
(default 2). Before layer ``i`` runs (a forward pre-hook), its block is brought to the device and
the layer's tensors become views of its device slot; then the window is filled with the next
streamed layers in cyclic order (from ``i``, wrapping into the next step), each copied on the
store's side stream while earlier layers compute. Room is made by evicting the streamed layer whose
next use is furthest away (``(j - i) mod n_layers``), which on a cyclic sweep is one that has
already run this step: never a layer needed sooner (plain LRU would evict exactly the layer needed
next and stream every layer). A step streams ``n_layers - slots + window`` layers, where
``window = min(slots, prefetch_depth + 1)``.
Why the window rather than Belady's minimum (``n_layers - slots + 1``, one slot rotating): with
one rotating slot, a layer's copy could start only when the layer before it had run, and nothing
would move while the resident layers, the LM head and sampling run; with two, the copy engine
always has the next layer to move (the first version, one rotating slot with copies through
``paged_copy_blocks``, reached 59-80% of the pinned rate on an H100). Bytes are moved only by
the store, so a layer read back from any tier is bit-identical (the disk tier checks records).

Decode steps do not replay as device graphs while weights move (the hooks move data between
steps); :func:`apt_hal.models.generate` checks :func:`is_streamed` and
:attr:`WeightStream.moves_weights`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import Optional, Union

import torch
from torch import nn

from apt_hal.paged_store import PagedTensor

_ALIGN = 64  # bytes: every tensor in a layer block, and the block itself, start at a multiple of this

Budget = Union[int, str]


def parse_memory(budget: Budget, total_bytes: int, name: str = "gpu_memory") -> int:
    """Bytes of a budget: an int, "<number>[KB|MB|GB|KiB|MiB|GiB]" or "<number>%" of ``total_bytes``."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        value = budget
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[KMG]i?B|B)?\s*", str(budget), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"{name} must be bytes (an int), a size such as '1.5GiB' or '800MB', or a percentage "
                             f"of the weight bytes such as '25%', got {budget!r}")
        # Exact arithmetic: in floats, 100% of some totals came out one byte short (one layer fewer fitted).
        number, unit = Fraction(match.group(1)), (match.group(2) or "B").upper()
        scale = Fraction(total_bytes, 100) if unit == "%" else {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                                                                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        value = math.floor(number * scale)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {budget!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Slice:
    """One tensor of a layer and where its bytes sit in the layer's block."""

    module: str  # qualified name inside the layer
    attr: str
    parameter: bool
    shape: tuple
    dtype: torch.dtype
    offset: int
    nbytes: int


def _layout(layer: nn.Module) -> tuple[list[_Slice], int]:
    slices, offset = [], 0
    for module_name, module in layer.named_modules():
        for attr, tensor, parameter in [*((a, t, True) for a, t in module.named_parameters(recurse=False)),
                                        *((a, t, False) for a, t in module.named_buffers(recurse=False))]:
            if tensor is None:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            slices.append(_Slice(module_name, attr, parameter, tuple(tensor.shape), tensor.dtype, offset, nbytes))
            offset += math.ceil(nbytes / _ALIGN) * _ALIGN
    return slices, max(offset, _ALIGN)


def _tensors(layer: nn.Module, slices: list[_Slice]) -> list[torch.Tensor]:
    return [getattr(layer.get_submodule(s.module), s.attr) for s in slices]


def moved_in(store_stats: dict) -> int:
    """Blocks copied up to the device, per a PagedTensor's ``stats()``."""
    return sum(n for route, n in store_stats["moved"].items() if route.endswith("->device"))


def written_back(store_stats: dict) -> int:
    """Blocks copied from device memory (the device tier or a parked buffer) down to the host or disk,
    per a PagedTensor's ``stats()``; blocks put back at a kept copy are not copies."""
    return sum(n for route, n in store_stats["moved"].items()
               if route.startswith(("device->", "parked->")) and route.endswith(("->host", "->disk")))


class WeightStream:
    """The layers of a model in a PagedTensor (see the module docstring); made by :func:`stream_weights`."""

    def __init__(self, model: nn.Module, gpu_memory: Budget, *, device=None, host_memory: Optional[Budget] = None,
                 disk_path: Optional[str] = None, prefetch_depth: Optional[int] = None):
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise TypeError(f"stream_weights needs a model with a non-empty 'layers' ModuleList, "
                            f"got {type(model).__name__}")
        self.layers = list(layers)
        self.slices, self.layer_bytes = _layout(self.layers[0])
        for i, layer in enumerate(self.layers[1:], 1):
            if _layout(layer) != (self.slices, self.layer_bytes):
                raise ValueError(f"stream_weights: layer {i} holds other tensors than layer 0 (names, shapes or "
                                 f"dtypes differ); every layer must have the same layout")
        in_layers = {id(t) for layer in self.layers for t in _tensors(layer, self.slices)}
        others = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in in_layers}
        self.resident_bytes = sum(t.numel() * t.element_size() for t in others.values())
        n = len(self.layers)
        self.weight_bytes = self.resident_bytes + n * self.layer_bytes
        budget = parse_memory(gpu_memory, self.weight_bytes)
        slots = min(n, (budget - self.resident_bytes) // self.layer_bytes)
        if slots < 1:
            raise ValueError(f"gpu_memory={gpu_memory!r} ({budget} bytes) is too small: the weights outside the "
                             f"layers take {self.resident_bytes} bytes and one layer {self.layer_bytes}")
        host = n if host_memory is None else min(n, parse_memory(host_memory, self.weight_bytes,
                                                                 "host_memory") // self.layer_bytes)
        disk = n - host
        self.capacity = slots
        if not self.moves_weights:
            host_slots = disk_slots = 0  # every layer stays on the device: no home copies needed
        elif disk and disk_path is None:
            raise ValueError(f"host_memory={host_memory!r} holds {host} of the {n} layers (the host, or the disk "
                             f"beyond it, keeps a copy of every layer): give disk_path for the other {disk}")
        else:  # one slot more on the lowest tier, as room for a layer without a copy there
            host_slots, disk_slots = (host, disk + 1) if disk else (host + 1, 0)
        self.device = torch.device(device) if device is not None else next(iter(others.values())).device
        self.store = PagedTensor((self.layer_bytes,), torch.uint8, self.device, slots, host_slots,
                                 disk_path if disk_slots else None, disk_slots)
        self.ids = self.store.allocate(n)
        if self.moves_weights:  # every layer's home is below the device: write it there
            self.store.evict([b for b in self.ids if self.store.tier_of(b) == "device"],
                             "host" if host_slots else "disk")
        for layer, block_id in zip(self.layers, self.ids):
            self.store.write_block(block_id, self._pack(layer))
            for s in self.slices:  # the bytes now live in the store; each run binds the views it needs
                self._set(layer, s, torch.empty(0, dtype=s.dtype))
        self.store.freeze(self.ids)
        model.to(self.device)  # what stays outside the store; the layers are empty by now
        depth = 1 if prefetch_depth is None else prefetch_depth
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"prefetch_depth must be an int >= 0, got {prefetch_depth!r}")
        self.window = min(slots, depth + 1)  # device slots the streamed layers take turns in
        self.resident_layers = slots - self.window if self.moves_weights else n
        self.streamed = list(range(self.resident_layers, n))
        self.accesses = self.misses = 0
        self._home = {i: self.store.tier_of(block_id) for i, block_id in enumerate(self.ids)}
        self.on_device = set(range(slots))
        if self.moves_weights:
            self.store.device_slots(self.ids[:slots])  # the first layers start on the device (home copies kept)
            self.store.pin(self.ids[:self.resident_layers])
            self._hooks = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        else:
            self.store.pin(self.ids)
            for i in range(n):
                self._bind(i)
            self._hooks = []

    @property
    def moves_weights(self) -> bool:
        """Whether layers move between tiers while the model runs (False when every layer fits the device)."""
        return self.capacity < len(self.layers)

    # ---- packing --------------------------------------------------------------------------

    def _pack(self, layer: nn.Module) -> torch.Tensor:
        block = torch.zeros(self.layer_bytes, dtype=torch.uint8)
        for s, t in zip(self.slices, _tensors(layer, self.slices)):
            block[s.offset:s.offset + s.nbytes] = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return block

    def unpack(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"module.attr": tensor} of one layer's block (views of ``block``)."""
        return {f"{s.module}.{s.attr}".lstrip("."): block[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
                for s in self.slices}

    @staticmethod
    def _set(layer: nn.Module, s: _Slice, tensor: torch.Tensor) -> None:
        module = layer.get_submodule(s.module)
        if s.parameter:
            getattr(module, s.attr).data = tensor
        else:
            module._buffers[s.attr] = tensor

    # ---- running --------------------------------------------------------------------------

    def _hook(self, i: int):
        def before_layer(module, args):
            self._bring(i)
        return before_layer

    def _distance(self, j: int, i: int) -> int:
        """How many layer runs after layer ``i`` layer ``j`` runs next."""
        return (j - i) % len(self.layers)

    def _window(self, i: int) -> list[int]:
        """The streamed layers that should be on the device while layer ``i`` runs: the first
        ``window`` of them in cyclic order from ``i`` (``i`` included, if it streams). The streamed
        layers are the last ones, so that order starts at ``i`` or, from a resident layer, at the
        first streamed one."""
        start = max(i - self.resident_layers, 0)
        count = len(self.streamed)
        return [self.streamed[(start + k) % count] for k in range(min(self.window, count))]

    def _make_room(self, i: int, keep: list[int]) -> None:
        """A free device slot while layer ``i`` runs, if none is free: evict the streamed layer outside
        ``keep`` needed furthest ahead (it goes back to its kept copy: no bytes move)."""
        if len(self.on_device) < self.capacity:
            return
        victim = max((j for j in self.on_device if j >= self.resident_layers and j not in keep),
                     key=lambda j: self._distance(j, i))
        self.store.evict([self.ids[victim]], self._home[victim])
        self.on_device.discard(victim)

    def _bind(self, i: int) -> None:
        """Make layer ``i``'s tensors views of its device slot (bringing its block there first)."""
        slot = self.store.device_slot(self.ids[i])  # a host-side int: no wait for the device
        block = self.store.pool[slot]
        for s in self.slices:
            self._set(self.layers[i], s, block[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape))

    def _bring(self, i: int) -> None:
        self.accesses += 1
        window = self._window(i)
        if i not in self.on_device:
            self.misses += 1
            self._make_room(i, [i, *window])
            self.on_device.add(i)
        self._bind(i)
        for j in window:  # the copies start now, on the store's side stream
            if j not in self.on_device:
                self._make_room(i, [i, *window])
                self.store.prefetch([self.ids[j]])
                self.on_device.add(j)

    # ---- reporting ------------------------------------------------------------------------

    def read_layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s block (uint8, on the CPU), read from whichever tier holds it."""
        return self.store.read_block(self.ids[i])

    def stats(self) -> dict:
        """Layer runs seen by the hooks (none when every layer is resident), those whose layer was
        resident (hits), bytes moved to the device, bytes copied back from it (``bytes_written_back``:
        only a layer's first eviction at construction), and the store's stats."""
        store = self.store.stats()
        return {"layer_runs": self.accesses, "hits": self.accesses - self.misses,
                "hit_rate": (self.accesses - self.misses) / self.accesses if self.accesses else 1.0,
                "bytes_streamed": moved_in(store) * self.layer_bytes,
                "bytes_written_back": written_back(store) * self.layer_bytes, "device_layers": self.capacity,
                "resident_layers": self.resident_layers, "window": self.window,
                "layer_bytes": self.layer_bytes, "resident_bytes": self.resident_bytes, "store": store}

    def close(self) -> None:
        """Remove the hooks and release the store (the model cannot run afterwards)."""
        for hook in self._hooks:
            hook.remove()
        self.store.close()


def stream_weights(model: nn.Module, gpu_memory: Budget, *, device=None, host_memory: Optional[Budget] = None,
                   disk_path: Optional[str] = None, prefetch_depth: Optional[int] = None) -> WeightStream:
    """Keep ``model``'s layers in a PagedTensor within ``gpu_memory`` of the device (see the module
    docstring) and run them through it; returns the :class:`WeightStream` (also ``model.weight_stream``).

    ``gpu_memory``: bytes, a size ("1.5GiB", "800MB") or a percentage of the weight bytes ("25%");
    it must hold the weights outside the layers and one layer. ``device``: where the model runs
    (default: where its weights are). ``host_memory``: room for layers' home copies on the host
    (default: every layer; unused when every layer fits the device) and ``disk_path`` (the
    store's file for the other homes). ``prefetch_depth``: streamed layers fetched ahead of the
    one running (default 1; each one more streams one more layer per step; 0: one slot rotates,
    Belady's minimum of bytes, and a streamed layer after another is copied only when needed).
    """
    stream = WeightStream(model, gpu_memory, device=device, host_memory=host_memory, disk_path=disk_path,
                          prefetch_depth=prefetch_depth)
    model.weight_stream = stream
    return stream


def is_streamed(model: nn.Module) -> bool:
    """Whether :func:`stream_weights` placed ``model``'s layers in a store."""
    return isinstance(getattr(model, "weight_stream", None), WeightStream)
