"""GLUE test: the npu backend through apt_hal's own dispatch, on a fake "npu" device.

In a subprocess (one PrivateUse1 backend per process): tests/fakes/npu_device.py registers a
Python "npu" device backed by CPU memory, tests/fakes/torch_npu_fake.py stands in for torch_npu,
and the probe is shown one /dev/davinci file. Then ``apt_hal.explain()`` must list the native
bindings, and the public ops, called on npu tensors under ``apt_hal.use("npu", strict=True)``
(a fallback to the reference would raise), must return the reference's results on the npu
device. This proves the glue, not the kernels: nothing here ran on Ascend hardware.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, warnings
from tests.fakes import npu_device, torch_npu_fake

npu_device.install()
fake = torch_npu_fake.make("Ascend910B3")
sys.modules["torch_npu"] = fake

import torch
import apt_hal
import apt_hal.backends.npu as npu_declaration
from apt_hal import mxfp4, ops
from apt_hal.errors import OpNotImplementedError

npu_declaration.device_files = lambda pattern: ["/dev/davinci0"]  # the probe's device check
out = {"explain": str(apt_hal.explain())}
g = torch.Generator().manual_seed(0)
npu = torch.device("npu")


def max_diff(got, want):
    return float((got.cpu().float() - want.float()).abs().max())


q, k = torch.randn(2, 3, 4, 128, generator=g).bfloat16(), torch.randn(2, 3, 2, 128, generator=g).bfloat16()
pos, cache = torch.randint(0, 8, (2, 3), generator=g), torch.randn(8, 64, generator=g)
x, logits = torch.randn(10, 32, generator=g), torch.randn(10, 4, generator=g)
w_up, w_down = torch.randn(4, 32, 32, generator=g) / 6, torch.randn(4, 32, 16, generator=g) / 4
pool, values = torch.randn(5, 4, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
slots, table = torch.tensor([1, -1, 14]), torch.tensor([[3, -1], [0, 4]])
w_packed, w_scales = mxfp4.quantize(torch.randn(16, 64, generator=g))

with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback warning would fail the run
    with apt_hal.use("npu", strict=True):
        q_out, k_out = ops.rotary(q.to(npu), k.to(npu), pos.to(npu), cache.to(npu), "gptj")
        q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, "gptj")
        out["rotary"] = {"device": q_out.device.type, "diff": max(max_diff(q_out, q_ref), max_diff(k_out, k_ref))}

        # The four steps one by one (moe_dispatch's loss helpers need ops the fake device lacks).
        on_npu = [t.to(npu) for t in (x, logits, w_up, w_down)]
        steps = {}
        for name, (xx, lg, wu, wd) in (("npu", on_npu), ("cpu", (x, logits, w_up, w_down))):
            with apt_hal.use(name, strict=True):
                weights, ids = ops.moe_route(lg, 2, "softmax_topk", True)
                order, offsets = ops.moe_permute(ids, 4, 4)  # capacity 4 of 5 per expert: some dropped
                y = ops.moe_experts(xx, order, offsets, wu, wd, None, None, None, None, 2, "swiglu", 1.702, 7.0)
                steps[name] = (ops.moe_combine(y, order, offsets, weights), order, offsets)
        (got, order, offsets), (want, order_ref, offsets_ref) = steps["npu"], steps["cpu"]
        out["moe"] = {"device": got.device.type, "diff": max_diff(got, want),
                      "same_permutation": bool(torch.equal(order.cpu(), order_ref)
                                               and torch.equal(offsets.cpu(), offsets_ref)),
                      "dropped": int(order_ref.numel() - offsets_ref[-1])}

        pool_npu = pool.to(npu)
        ops.paged_write(pool_npu, values.to(npu), slots.to(npu))
        gathered = ops.paged_gather(pool_npu, table.to(npu))
        pool_ref = pool.clone()
        ops.paged_write.reference(pool_ref, values, slots)
        out["paged"] = {"device": gathered.device.type, "pool_equal": bool(torch.equal(pool_npu.cpu(), pool_ref)),
                        "gather_equal": bool(torch.equal(gathered.cpu(), ops.paged_gather.reference(pool_ref, table)))}

        try:
            ops.fp4_matmul(torch.randn(2, 64).bfloat16().to(npu), w_packed.to(npu), w_scales.to(npu))
            out["fp4_strict"] = "ran"
        except OpNotImplementedError as e:
            out["fp4_strict"] = str(e)

out["vendor_ops"] = sorted({c.name for c in fake.calls})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fake_npu_run():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("APT_HAL_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_explain_shows_the_native_npu_bindings(fake_npu_run):
    text = fake_npu_run["explain"]
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "torch_npu installed, 1 Ascend device(s)" in rows["npu"]
    for op, binding in [("rotary", "npu_apply_rotary_pos_emb+npu_rotary_mul *"),
                        ("moe_route", "npu_moe_gating_top_k_softmax *"),
                        ("moe_permute", "npu_moe_init_routing_v2 *"), ("moe_experts", "npu_grouped_matmul *"),
                        ("moe_combine", "npu_moe_finalize_routing *"),
                        ("paged_write", "npu_scatter_pa_kv_cache | torch_indexing *"),
                        ("paged_gather", "npu_gather_pa_kv_cache | torch_indexing *"),
                        ("paged_copy_blocks", "torch_indexing *")]:
        assert binding in rows[op], rows[op]
    assert "reference (Ascend910B3: MXFP4 weights need an Ascend 950" in rows["fp4_matmul"]


def test_ops_on_npu_tensors_run_the_bindings_and_match_the_reference(fake_npu_run):
    assert fake_npu_run["rotary"] == {"device": "npu", "diff": 0.0}
    moe = fake_npu_run["moe"]
    assert moe["device"] == "npu" and moe["diff"] < 1e-5 and moe["same_permutation"] and moe["dropped"] > 0
    assert fake_npu_run["paged"] == {"device": "npu", "pool_equal": True, "gather_equal": True}
    assert fake_npu_run["vendor_ops"] == ["npu_gather_pa_kv_cache", "npu_grouped_matmul", "npu_moe_finalize_routing",
                                          "npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_rotary_mul",
                                          "npu_scatter_pa_kv_cache"]


def test_fp4_matmul_without_mxfp4_names_the_reason_under_strict(fake_npu_run):
    assert "MXFP4 weights need an Ascend 950" in fake_npu_run["fp4_strict"]
    assert "declined this call" in fake_npu_run["fp4_strict"]


def test_import_and_explain_never_import_the_vendor_stacks():
    code = ("import sys, apt_hal; apt_hal.explain(); print(sorted(m for m in sys.modules if m.startswith("
            "('torch_npu', 'habana_frameworks', 'apt_hal.backends.npu', 'apt_hal.backends.hpu'))))")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The declarations only: no implementation module, no vendor stack.
    assert proc.stdout.strip() == "['apt_hal.backends.hpu', 'apt_hal.backends.npu']"
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if m.startswith(("torch_npu", "habana_frameworks"))]
