"""The compile matrix: kernels compiled for GPUs that are not here, reported as their own level."""

import pathlib

import pytest
import torch

import apt_hal
from apt_hal import mxfp4
from apt_hal.backends import triton_vendor
from apt_hal.backends.rocm import arch
from apt_hal.conformance import compile_matrix as cm
from apt_hal.conformance import reports, status

TESTS = pathlib.Path(__file__).parent


@pytest.fixture
def kernels_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


def _launch(kernel, signature, constexprs, **options):
    return {"module": "compile_kernels", "kernel": kernel, "signature": signature, "constexprs": constexprs,
            "options": options}


@pytest.mark.usefixtures("kernels_importable")
def test_one_kernel_compiles_for_amd_and_nvidia():
    launch = _launch("dot_kernel", {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                     {"BLOCK": 64}, num_warps=4)
    amd, nvidia = cm._compile_all([{"launch": launch, "target": "gfx942"}, {"launch": launch, "target": "sm_90"}], 1)
    assert amd["status"] == nvidia["status"] == cm.COMPILED
    assert (amd["binary"], nvidia["binary"]) == ("hsaco", "cubin")
    assert len(amd["sha256"]) == 64 and amd["sha256"] != nvidia["sha256"]
    assert amd["instruction"]["verdict"] == "v_mfma present", amd["instruction"]
    assert nvidia["instruction"]["verdict"] == "wgmma present", nvidia["instruction"]


@pytest.mark.usefixtures("kernels_importable")
def test_a_kernel_that_does_not_compile_is_failed_to_compile():
    launch = _launch("ptx_kernel", {"x_ptr": "*i32", "BLOCK": "constexpr"}, {"BLOCK": 128})
    amd, nvidia = cm._compile_all([{"launch": launch, "target": "gfx942"}, {"launch": launch, "target": "sm_90"}], 2)
    assert amd["status"] == cm.FAILED_TO_COMPILE and amd["message"], amd
    assert nvidia["status"] == cm.COMPILED and nvidia["inline_asm"] == ["mov.b32 $0, $1;"]


def _captured_fp4_matmul_launch(monkeypatch) -> dict:
    """The fp4_matmul kernel's launch as the rocm backend makes it (captured in the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    from apt_hal.backends.cuda_triton import fp4_matmul

    monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)  # restored after the test
    launches = {}
    cm._record_launches(launches)
    w_packed, w_scales = mxfp4.quantize(torch.randn(32, 64))
    with triton_vendor.using(arch.ARCHES["gfx942"]):
        fp4_matmul.matmul(torch.randn(4, 64, dtype=torch.bfloat16), w_packed, w_scales)
    (launch,) = [v for v in launches.values() if v["kernel"] == "_fp4_matmul_kernel"]
    return launch


def test_amd_builds_of_fp4_matmul_take_the_path_without_ptx(monkeypatch):
    launch = _captured_fp4_matmul_launch(monkeypatch)
    assert launch["constexprs"]["INTERPRETER"] is True and launch["options"]["matrix_instr_nonkdim"] == 16
    ptx_path = {**launch, "constexprs": {**launch["constexprs"], "INTERPRETER": False}}
    *portable, with_ptx = cm._compile_all([{"launch": launch, "target": "gfx942"},
                                           {"launch": launch, "target": "gfx950"},
                                           {"launch": ptx_path, "target": "gfx950"}], 3)
    for cell in portable:
        assert cell["status"] == cm.COMPILED and cell["inline_asm"] == [], cell
        assert cell["instruction"]["verdict"] == "v_mfma present"
    assert with_ptx["status"] == cm.FAILED_TO_COMPILE  # why the vendor layer picks the portable path


def test_targets_outside_a_backend_are_unsupported_with_the_reason():
    assert "does not build for sm_90" in cm.unsupported_reason("rocm", "sm_90")
    assert "does not build for gfx942" in cm.unsupported_reason("cuda-triton", "gfx942")
    assert "triton-xpu" in cm.unsupported_reason("xpu", "gfx942")
    assert "not a Triton backend" in cm.unsupported_reason("cpu", "sm_90")
    assert cm.unsupported_reason("rocm", "gfx950") is None
    with pytest.raises(ValueError, match="unknown target.*gfx1"):
        cm.parse_targets("gfx942,gfx1")


def _report(compile_status: str, known=None, case_status=status.PASS, device_type="cpu") -> dict:
    cell = {"backend": "rocm", "target": "gfx950", "kernel": "_moe_up_kernel", "module": "m", "signature": {},
            "constexprs": {"BLOCK_M": 16}, "options": {}, "status": compile_status, "message": "error: boom",
            "known": known, "binary": "hsaco", "sha256": "0" * 64, "inline_asm": [],
            "instruction": {"verdict": "v_mfma present"}}
    return {"backends": {"rocm": {"status": "RAN", "device_type": device_type, "detail": "", "device": None}},
            "cases": [{"backend": "rocm", "status": case_status}],
            "compile": {"triton": "3.9.0", "targets": ["gfx950"], "backends": {}, "tiles": "t", "seconds": 1.0,
                        "cells": [cell]}}


def test_a_compile_is_never_presented_as_a_pass_on_hardware():
    level = cm.levels(_report(cm.COMPILED))["rocm"]
    assert level == ("compiled for gfx950, never run on that hardware; "
                     "numerics under Triton's interpreter on CPU: PASS")
    assert cm.levels(_report(cm.COMPILED, device_type="cuda"))["rocm"].startswith("numerics on hardware (cuda): PASS")
    failed = _report(cm.FAILED_TO_COMPILE)
    assert cm.levels(failed)["rocm"] == "numerics under Triton's interpreter on CPU: PASS"
    assert ("| rocm | gfx950 | `_moe_up_kernel` BLOCK_M=16 | FAILED_TO_COMPILE | error: boom |"
            in cm.markdown(failed["compile"]))


def test_unexplained_compile_failures_fail_the_run_known_ones_do_not():
    assert reports.exit_code(_report(cm.FAILED_TO_COMPILE)) == status.EXIT_FAILED
    assert reports.exit_code(_report(cm.FAILED_TO_COMPILE, known="gfx950 rejects this tile")) == 0
    assert reports.exit_code(_report(cm.COMPILED)) == 0


def test_known_failures_match_on_backend_target_kernel_and_constexprs():
    cell = _report(cm.FAILED_TO_COMPILE)["compile"]["cells"][0]
    entry = {"backend": "rocm", "target": "gfx950", "kernel": "_moe_up_kernel", "reason": "r"}
    assert cm._known([entry], cell) == "r"
    assert cm._known([{**entry, "constexprs": {"BLOCK_M": 32}}], cell) is None


def test_cli_rejects_an_unknown_target(tmp_path, capsys):
    from apt_hal.cli import main

    assert main(["conformance", "--compile-only", "--target", "gfx9999", "--report", str(tmp_path)]) == 2
    assert "unknown target(s) gfx9999" in capsys.readouterr().err


def test_fp16_moe_gemms_compile_for_gfx950(monkeypatch):
    """gfx950's Triton rejects input_precision "tf32" (found by the compile matrix): the AMD
    configuration passes "ieee", exact for 16-bit operands."""
    from triton.runtime.interpreter import InterpretedFunction

    from apt_hal import ops

    monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)  # restored after the test
    launches = {}
    cm._record_launches(launches)
    monkeypatch.setenv("APT_HAL_ROCM_ARCH", "gfx950")
    torch.manual_seed(0)
    x = torch.randn(4, 64, dtype=torch.float16)
    _, ids = ops.moe_route(torch.randn(4, 4), 1)
    assignments, offsets = ops.moe_permute(ids, 4)
    w_up, w_down = torch.randn(4, 64, 64, dtype=torch.float16), torch.randn(4, 64, 32, dtype=torch.float16)
    with apt_hal.use("rocm", strict=True):
        ops.moe_experts(x, assignments, offsets, w_up, w_down)
    (up,) = [v for v in launches.values() if v["kernel"] == "_moe_up_kernel"]
    assert up["constexprs"]["DOT_PRECISION"] == "ieee"
    (result,) = cm._compile_all([{"launch": up, "target": "gfx950"}], 1)
    assert result["status"] == cm.COMPILED, result["message"]


def test_merging_a_compile_report_with_a_numeric_one_keeps_both():
    numeric = {**_report(cm.COMPILED), "schema": reports.SCHEMA_MAJOR, "runs": [{}],
               "timing": {"runs": [], "cases": {}}}
    del numeric["compile"]
    numeric["backends"]["rocm"]["run"] = 0
    compiled = {**_report(cm.COMPILED), "schema": reports.SCHEMA_MAJOR, "runs": [{}], "cases": [],
                "timing": {"runs": [], "cases": {}}}
    compiled["backends"] = {"rocm": {**compiled["backends"]["rocm"], "status": "NOT_RUN", "run": 0}}
    merged = reports.merge([numeric, compiled])
    assert merged["compile"]["cells"] == compiled["compile"]["cells"]
    assert cm.levels(merged)["rocm"] == ("compiled for gfx950, never run on that hardware; "
                                         "numerics under Triton's interpreter on CPU: PASS")
