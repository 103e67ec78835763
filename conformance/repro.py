"""Reproduction bundles for failing cases, one folder each::

    <report>/repro/<backend>/<case id, '/' as '__'>/
        inputs.safetensors    the arguments: each tensor's whole storage, typed, plus metadata that
                              rebuilds the exact views (shape, strides, offset, shared storage)
                              and holds the non-tensor arguments
        expected.safetensors  the reference's outputs
        actual.safetensors    the backend's outputs (absent when it raised)
        case.json             the case's report record (with ``rerun``, the command that re-runs
                              it) and the seed

``load(path)`` rebuilds a file's arguments exactly, e.g. to step through a kernel::

    args = apt_hal.conformance.repro.load("repro/cuda-triton/rotary__bfloat16__gqa_hq8_hk2/inputs.safetensors")
    apt_hal.ops.rotary(**args)
"""

from __future__ import annotations

import json
import pathlib

import torch

from apt_hal.atomic import atomic_write, atomic_write_text
from apt_hal.conformance.spec import storage_elements

# Dtypes safetensors cannot store: saved as their bytes, with the dtype in the metadata.
_AS_BYTES = tuple(getattr(torch, n) for n in ("float4_e2m1fn_x2", "float8_e8m0fnu") if hasattr(torch, n))


def bundle_name(backend: str, case_id: str) -> str:
    return f"repro/{backend}/{case_id.replace('/', '__')}"


def save(path: pathlib.Path, values: dict) -> None:
    """Save ``values`` (tensors, views included, and JSON-able non-tensors) to one safetensors file."""
    from safetensors.torch import save_file

    storages, keys, meta = {}, {}, {}
    for name, v in values.items():
        if not isinstance(v, torch.Tensor):
            meta[name] = json.dumps({"value": v})
            continue
        v = v.detach().cpu()
        sid = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes(), v.dtype)
        if sid not in keys:
            keys[sid] = f"storage{len(keys)}"
            flat = storage_elements(v)
            # A copy: safetensors refuses tensors that share memory with anything else.
            storages[keys[sid]] = (flat.view(torch.uint8) if v.dtype in _AS_BYTES else flat).clone()
        meta[name] = json.dumps({"storage": keys[sid], "dtype": str(v.dtype).removeprefix("torch."),
                                 "shape": list(v.shape), "stride": list(v.stride()), "offset": v.storage_offset()})
    atomic_write(path, lambda tmp: save_file(storages, str(tmp), metadata=meta))


def load(path) -> dict:
    """The values :func:`save` stored, views rebuilt on shared storages."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        storages = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, text in meta.items():
        m = json.loads(text)
        if "value" in m:
            out[name] = m["value"]
            continue
        flat = storages[m["storage"]].view(getattr(torch, m["dtype"]))
        out[name] = flat.as_strided(m["shape"], m["stride"], m["offset"])
    return out


def write_bundle(report_dir: pathlib.Path, record: dict, tensors: dict, seed: int) -> str:
    """Write a case's bundle; returns its folder relative to ``report_dir``."""
    rel = bundle_name(record["backend"], record["id"])
    folder = report_dir / rel
    folder.mkdir(parents=True, exist_ok=True)
    note = None
    try:
        for part in ("inputs", "expected", "actual"):
            if tensors.get(part):
                save(folder / f"{part}.safetensors", tensors[part])
    except ImportError:
        note = "tensors not saved: safetensors is not installed (pip install safetensors)"
    case = {k: v for k, v in record.items() if k != "repro"}
    atomic_write_text(folder / "case.json", json.dumps({**case, "seed": seed, "note": note}, indent=2) + "\n")
    return rel
