"""The huawei-cloud wire format: round trips, safetensors compatibility, and a decoder that refuses
every malformed frame with a FrameError (never another exception, never an allocation it was not
given the bytes for)."""

import json
import random
import struct

import pytest
import torch

from apt_hal import mxfp4
from apt_hal.backends.huawei_cloud import wire

LIMITS = wire.Limits(max_bytes=1 << 20, max_elements=1 << 16, max_dims=4, max_tensors=8)


def _frame(header: dict, data: bytes = b"", message: dict = None) -> bytearray:
    header = {"__metadata__": {"apt_hal": json.dumps(message or {"op": "rotary"})}, **header}
    raw = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


def test_round_trip_keeps_values_dtypes_and_shapes_of_strided_and_empty_tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"strided": base.t(), "bf16": base.to(torch.bfloat16)[:, 1:3], "idx": torch.tensor([3, -1]),
               "empty": torch.empty(0, 5, dtype=torch.int32), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5, dtype=torch.float16)}
    message, out = wire.decode(bytearray(wire.encode({"op": "x", "n": 1}, tensors)))
    assert message == {"op": "x", "n": 1}
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t), name


@pytest.mark.skipif(not mxfp4.HAS_TORCH_FP4, reason="this torch has no float4_e2m1fn_x2")
def test_mxfp4_dtypes_travel_as_u8_with_the_real_dtype_in_the_message():
    packed, scales = mxfp4.quantize(torch.randn(8, 64))
    w, s = mxfp4.to_torch_dtypes(packed, scales)
    frame = wire.encode({}, {"w": w, "s": s})
    header = json.loads(frame[8:8 + struct.unpack_from("<Q", frame)[0]])
    assert header["w"]["dtype"] == header["s"]["dtype"] == "U8"
    assert json.loads(header["__metadata__"]["apt_hal"])["dtypes"] == {"w": "float4_e2m1fn_x2", "s": "float8_e8m0fnu"}
    _, out = wire.decode(bytearray(frame))
    assert out["w"].dtype == torch.float4_e2m1fn_x2 and out["s"].dtype == torch.float8_e8m0fnu
    assert torch.equal(out["w"].view(torch.uint8), packed) and torch.equal(out["s"].view(torch.uint8), scales)


def test_a_frame_is_a_safetensors_file():
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    loaded = safetensors.load(wire.encode({"op": "x"}, tensors))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_decoded_tensors_are_writable_views_of_the_frame():
    frame = bytearray(wire.encode({}, {"q": torch.zeros(4)}))
    _, out = wire.decode(frame)
    out["q"].add_(1)  # an in-place op on the server writes into the request's buffer, no copy made
    assert wire.decode(frame)[1]["q"].tolist() == [1.0] * 4


@pytest.mark.parametrize("frame, status, words", [
    (bytearray(b"\x01\x02"), 400, "shorter than"),
    (bytearray(struct.pack("<Q", 1 << 40)), 413, "header of"),
    (bytearray(struct.pack("<Q", 100) + b"{}"), 400, "runs past"),
    (bytearray(struct.pack("<Q", 2) + b"[]"), 400, "not a safetensors header"),
    (bytearray(struct.pack("<Q", 5) + b"\xff\xfe{}}"), 400, "not a safetensors header"),
    (_frame({"t": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), 400, "unknown dtype"),
    (_frame({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), 400, "negative size"),
    (_frame({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, bytes(4)), 400, "integer"),
    (_frame({"t": {"dtype": "F32", "shape": [1] * 5, "data_offsets": [0, 4]}}, bytes(4)), 400, "at most 4"),
    (_frame({"t": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 4]}}, bytes(4)), 413, "elements"),
    (_frame({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), 400, "do not hold"),
    (_frame({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), 400, "do not hold"),
    (_frame({"t": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(8)), 400, "aligned"),
    (_frame({"t": {"dtype": "F32", "shape": [1]}}), 400, "exactly dtype"),
    (_frame({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(9)}), 413, "tensors"),
    (_frame({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
            {"dtypes": {"t": "float4_e2m1fn_x2"}}), 400, "logical dtype"),
    (bytearray(2 << 20), 413, "limit"),
])
def test_malformed_frames_are_refused_with_the_status_to_answer(frame, status, words):
    with pytest.raises(wire.FrameError, match=words) as e:
        wire.decode(frame, LIMITS)
    assert e.value.status == status


def test_fuzzed_frames_raise_only_frame_errors():
    """20,000 mutations of valid frames (bytes flipped, cut, extended, header fields rewritten)."""
    rng = random.Random(0)
    seeds = [wire.encode({"op": "rotary", "args": [{"tensor": "a0"}, 3, "neox"]},
                         {"a0": torch.randn(2, 3), "a1": torch.arange(5, dtype=torch.int32)}),
             wire.encode({}, {"w": torch.zeros(16, dtype=torch.uint8)})]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(20000):
        frame = bytearray(rng.choice(seeds))
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif kind == 1:
            del frame[rng.randrange(len(frame)):]
        elif kind == 2:
            frame[0:8] = struct.pack("<Q", rng.choice([0, 1, len(frame), 1 << 63, rng.randrange(1 << 16)]))
        else:
            frame = bytearray(rng.randbytes(rng.randrange(64)))
        try:
            message, tensors = wire.decode(frame, LIMITS)
            for value in message.get("args", []):
                wire.unpack_value(value, tensors)
            outcomes["ok"] += 1
        except wire.FrameError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 15000  # most mutations break the frame; none raised anything else


def test_content_key_depends_on_bytes_dtype_and_shape():
    t = torch.arange(8, dtype=torch.uint8)
    keys = {wire.content_key(t), wire.content_key(t.clone()), wire.content_key(t.reshape(2, 4)),
            wire.content_key(t.to(torch.int8)), wire.content_key(t + 1)}
    assert len(keys) == 4  # the clone has its original's key


def test_values_pack_and_unpack_including_tuples_and_resident_weights():
    tensors = {}
    packed = wire.pack_value((torch.ones(2), None, 3, 1.5, "gptj", True), tensors, "r")
    out = wire.unpack_value(json.loads(json.dumps(packed)), tensors)
    assert torch.equal(out[0], torch.ones(2)) and out[1:] == (None, 3, 1.5, "gptj", True)
    assert wire.unpack_value({"resident": "k"}, {}, {"k": "weight"}) == "weight"
    for bad in ({"tensor": "missing"}, {"tuple": 3}, {"eval": "1+1"}, [1]):
        with pytest.raises(wire.FrameError):
            wire.unpack_value(bad, tensors)
    with pytest.raises(wire.FrameError, match="dict"):
        wire.pack_value({"a": 1}, {}, "a")
