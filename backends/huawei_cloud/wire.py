"""The wire format of the huawei-cloud backend: one frame is a byte-exact safetensors blob.

Layout (the safetensors layout, so any safetensors reader can inspect a captured frame)::

    u64 little-endian N | N bytes of JSON header | tensor data

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
into the data that follows the header) and holds ``"__metadata__": {"apt_hal": "<JSON>"}``: the
message itself (op, arguments, request id, result). Tensors travel dense and row-major (the
strides are implied by the shape; the caller's strides were checked by the contract before the
call left the client). The header is padded so the data begins 64-byte aligned, and tensors follow
each other without gaps, widest elements first, so each starts aligned to its element size.

safetensors cannot load torch's MXFP4 dtypes, so ``float4_e2m1fn_x2`` and ``float8_e8m0fnu``
travel as ``U8`` with their real dtype in the message's ``"dtypes"`` map.

Decoding executes nothing (no pickle, no ``torch.load``, no ``eval``): it parses JSON, checks every
declared dtype, shape and offset against the frame's real length and the :class:`Limits`, then
views the bytes with ``torch.frombuffer``. Every violation is a :class:`FrameError` carrying the
HTTP status the server answers with (400 malformed, 413 too large).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from typing import Any, Optional

import torch

ALIGN = 64
FRAME_TYPE = "application/vnd.apt-hal.frame"  # the media type of a frame over HTTP
REQUEST_ID = "x-apt-hal-request-id"  # a fresh id per request: replays are refused, replies echo it
REQUEST_TIME = "x-apt-hal-time"  # Unix seconds when sent: stale requests are refused
_PREFIX = struct.Struct("<Q")

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Byte-sized dtypes that travel as U8 with their name in the message.
LOGICAL_DTYPES = {name: getattr(torch, name) for name in ("float4_e2m1fn_x2", "float8_e8m0fnu", "float8_e4m3fn",
                                                           "float8_e5m2") if hasattr(torch, name)}


class FrameError(ValueError):
    """A frame or message that breaks the format or the limits; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may declare. Checked before anything is allocated."""

    max_bytes: int = 1 << 30
    max_elements: int = 1 << 28
    max_dims: int = 8
    max_tensors: int = 32
    max_header_bytes: int = 1 << 16


def dtype_label(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _wire_view(t: torch.Tensor) -> tuple[torch.Tensor, str, Optional[str]]:
    """(dense CPU tensor to send, safetensors dtype, logical dtype or None)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in SAFETENSORS_DTYPES:
        return t, SAFETENSORS_DTYPES[t.dtype], None
    label = dtype_label(t)
    if label in LOGICAL_DTYPES:
        return t.view(torch.uint8), "U8", label
    raise FrameError(f"dtype {label} cannot travel to the huawei-cloud server")


def encode(message: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """One frame holding ``message`` and ``tensors`` (any device, any strides)."""
    return b"".join(encode_parts(message, tensors))


def encode_parts(message: dict, tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The frame of :func:`encode` as pieces to send one after the other, the tensors not copied."""
    entries, parts, logical, offset = {}, [], {}, 0
    views = {name: _wire_view(t) for name, t in tensors.items()}
    # Widest elements first: every tensor then starts aligned to its element size without the
    # gaps between tensors that safetensors forbids.
    for name, (dense, st_dtype, label) in sorted(views.items(), key=lambda kv: -kv[1][0].element_size()):
        if label:
            logical[name] = label
        nbytes = dense.numel() * dense.element_size()
        entries[name] = {"dtype": st_dtype, "shape": list(dense.shape), "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            parts.append(dense.reshape(-1).view(torch.uint8).numpy().data)
        offset += nbytes
    meta = dict(message, dtypes=logical) if logical else message
    header = json.dumps({"__metadata__": {"apt_hal": json.dumps(meta)}, **entries},
                        separators=(",", ":")).encode()
    header += b" " * (-(len(header) + _PREFIX.size) % ALIGN)  # safetensors pads with spaces
    return [memoryview(_PREFIX.pack(len(header)) + header), *parts]


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise FrameError(f"{what} must be an integer, got {value!r:.40}")
    return value


def _tensor_entry(name: str, entry: Any, data_len: int, limits: Limits) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FrameError(f"tensor {name!r:.40}: the entry must have exactly dtype, shape and data_offsets")
    dtype = _BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise FrameError(f"tensor {name!r:.40}: unknown dtype {entry['dtype']!r:.40}; known: {', '.join(_BY_NAME)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > limits.max_dims:
        raise FrameError(f"tensor {name!r:.40}: shape must be a list of at most {limits.max_dims} sizes")
    for d in shape:
        if _int(d, f"tensor {name!r:.40}: a size") < 0:
            raise FrameError(f"tensor {name!r:.40}: negative size in shape {shape}")
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise FrameError(f"tensor {name!r:.40}: {numel} elements, more than the limit {limits.max_elements}", 413)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise FrameError(f"tensor {name!r:.40}: data_offsets must be [begin, end]")
    begin, end = (_int(o, f"tensor {name!r:.40}: an offset") for o in offsets)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
        raise FrameError(f"tensor {name!r:.40}: data_offsets {offsets} do not hold {shape} {entry['dtype']} "
                         f"within {data_len} data bytes")
    if begin % itemsize:
        raise FrameError(f"tensor {name!r:.40}: data offset {begin} is not aligned to {itemsize} bytes")
    return dtype, shape, begin, numel


def decode(frame: bytearray, limits: Limits = Limits()) -> tuple[dict, dict[str, torch.Tensor]]:
    """(message, tensors) from one frame. Tensors view ``frame`` (writable, no copy)."""
    if len(frame) > limits.max_bytes:
        raise FrameError(f"frame of {len(frame)} bytes, more than the limit {limits.max_bytes}", 413)
    if len(frame) < _PREFIX.size:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than its 8-byte header length")
    (n,) = _PREFIX.unpack_from(frame)
    if n > limits.max_header_bytes:
        raise FrameError(f"header of {n} bytes, more than the limit {limits.max_header_bytes}", 413)
    start = _PREFIX.size + n
    if start > len(frame):
        raise FrameError(f"header length {n} runs past the frame's {len(frame)} bytes")
    try:
        header = json.loads(bytes(frame[_PREFIX.size:start]))
        metadata = header.pop("__metadata__")
        message = json.loads(metadata["apt_hal"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise FrameError(f"the header is not a safetensors header with apt_hal metadata: {type(e).__name__}") from None
    if not isinstance(message, dict):
        raise FrameError("the apt_hal metadata must be a JSON object")
    if len(header) > limits.max_tensors:
        raise FrameError(f"{len(header)} tensors, more than the limit {limits.max_tensors}", 413)
    logical = message.get("dtypes", {})
    if not isinstance(logical, dict):
        raise FrameError("'dtypes' must map tensor names to dtype names")
    data_len = len(frame) - start
    tensors = {}
    for name, entry in header.items():
        dtype, shape, begin, numel = _tensor_entry(name, entry, data_len, limits)
        t = (torch.frombuffer(frame, dtype=dtype, count=numel, offset=start + begin) if numel
             else torch.empty(0, dtype=dtype))
        t = t.reshape(shape)
        if name in logical:
            label = logical[name]
            if dtype is not torch.uint8 or not isinstance(label, str) or label not in LOGICAL_DTYPES:
                raise FrameError(f"tensor {name!r:.40}: logical dtype {label!r:.40} must be one of "
                                 f"{', '.join(LOGICAL_DTYPES)} over U8")
            t = t.view(LOGICAL_DTYPES[label])
        tensors[name] = t
    return message, tensors


def content_key(t: torch.Tensor) -> str:
    """The name of a resident weight: a hash of its dtype, shape and bytes."""
    dense, _, _ = _wire_view(t)
    h = hashlib.blake2b(f"{dtype_label(t)}{list(t.shape)}".encode(), digest_size=32)
    if dense.numel():
        h.update(dense.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---- values inside a message ----------------------------------------------------------------
# A tensor argument or result is {"tensor": name}; a resident weight is {"resident": key}; a tuple
# of results is {"tuple": [...]}; None, bools, numbers and strings are themselves.

SCALARS = (type(None), bool, int, float, str)


def pack_value(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """``value`` as JSON, adding its tensors to ``tensors``."""
    if isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value
        return {"tensor": name}
    if isinstance(value, tuple):
        return {"tuple": [pack_value(v, tensors, prefix) for v in value]}
    if isinstance(value, SCALARS):
        return value
    raise FrameError(f"a {type(value).__name__} cannot travel to the huawei-cloud server")


def unpack_value(value: Any, tensors: dict[str, torch.Tensor], resident: Optional[dict] = None) -> Any:
    """The inverse of :func:`pack_value`; ``resident`` maps keys to the server's weights."""
    if isinstance(value, dict):
        if set(value) == {"tensor"} and isinstance(value["tensor"], str) and value["tensor"] in tensors:
            return tensors[value["tensor"]]
        if set(value) == {"resident"} and resident is not None and isinstance(value["resident"], str):
            return resident[value["resident"]]
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(unpack_value(v, tensors, resident) for v in value["tuple"])
        raise FrameError(f"unknown value {json.dumps(value)[:60]}")
    if isinstance(value, SCALARS):
        return value
    raise FrameError(f"unknown value {json.dumps(value)[:60]}")
