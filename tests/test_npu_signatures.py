"""Signature drift: the torch_npu calls the npu bindings make (backends/npu/signatures.py, which
tests/test_npu_glue.py checks every recorded call against) versus a torch-npu wheel's op schemas
and documentation, read from the wheel as text; torch_npu is never imported or installed.

The wheel check is opt-in: set APT_HAL_VENDOR_WHEEL_DIR to a folder holding torch_npu-*.whl
(``pip download --no-deps torch-npu==2.13.0 -d DIR``; 43.6 MB). Without it that test is skipped,
and says so; the parser tests below always run.
"""

import os
import pathlib

import pytest

from apt_hal.backends.npu import signatures

WHEEL_DIR = os.environ.get("APT_HAL_VENDOR_WHEEL_DIR")

# One schema entry per line, as in torch_npu's native_functions YAML.
SCHEMA = (
    "\n- func: npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) -> Tensor"
    "\n- func: npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, int active_num=-1, "
    "int[2] active_expert_range=[], int row_idx_type=0) -> (Tensor, Tensor)\n"
)


def test_parse_schema_and_documented_prototypes():
    assert signatures.parse_signature(SCHEMA, "npu_rotary_mul") == (("self", "r1", "r2", "rotary_mode", "rotate"), ())
    assert signatures.parse_signature(SCHEMA, "npu_moe_init_routing_v2") == (
        ("x", "expert_idx"), ("active_num", "active_expert_range", "row_idx_type"))
    doc = ("torch_npu.npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout='BSND', rotary_mode='half') "
           "-> (Tensor, Tensor)")
    assert signatures.parse_signature(doc, "npu_apply_rotary_pos_emb") == (("query", "key", "cos", "sin"),
                                                                          ("layout", "rotary_mode"))
    assert signatures.parse_signature(SCHEMA, "npu_grouped_matmul") is None


def test_drift_reports_a_renamed_keyword():
    problems = signatures.drift(SCHEMA.replace("row_idx_type", "index_type"), "")
    assert "npu_moe_init_routing_v2: keyword 'row_idx_type' is not in " + signatures.SCHEMA_FILE in problems
    assert "npu_grouped_matmul: no schema in " + signatures.SCHEMA_FILE in problems


@pytest.mark.skipif(not WHEEL_DIR, reason="opt-in: set APT_HAL_VENDOR_WHEEL_DIR to a folder with a torch_npu wheel")
def test_bindings_match_the_wheels_schemas_and_docs():
    wheels = sorted(pathlib.Path(WHEEL_DIR).glob("torch_npu-*.whl"))
    assert wheels, f"no torch_npu-*.whl in {WHEEL_DIR}"
    for wheel in wheels:
        assert signatures.drift(*signatures.read_wheel(wheel)) == [], wheel.name
