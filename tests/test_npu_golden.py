"""Golden data for vendor CI (apt_hal.conformance.golden): written on the CPU, checked without
running the reference. An npu/Gaudi host runs ``apt-hal conformance --backend npu --golden DIR``;
here the checks run on the cpu backend, and npu stays NOT_RUN with its probe's reason."""

import json

import pytest
import torch

from apt_hal import cli, registry
from apt_hal.conformance import golden, repro, runner, status

CASES = ["rotary/bfloat16/*", "paged_write/float16/*", "moe_combine/float32/*"]


@pytest.fixture
def golden_dir(tmp_path):
    entries = golden.write(tmp_path, runner.select_cases(patterns=CASES))
    assert entries
    return tmp_path


def test_write_stores_inputs_and_reference_outputs(golden_dir):
    index = json.loads((golden_dir / "golden.json").read_text())
    assert index["schema"] == golden.SCHEMA and index["seed"] == 0
    ids = [e["id"] for e in index["cases"]]
    assert any(i.startswith("paged_write/") for i in ids) and any(i.startswith("rotary/") for i in ids)
    first = next(e for e in index["cases"] if e["op"] == "rotary")
    inputs = repro.load(golden_dir / first["folder"] / "inputs.safetensors")
    expected = repro.load(golden_dir / first["folder"] / "expected.safetensors")
    q_ref, _ = torch.ops.apt_hal.rotary.default(inputs["q"], inputs["k"], inputs["positions"], inputs["cos_sin_cache"],
                                                inputs["style"])
    assert torch.equal(expected["q_out"], q_ref)


def test_cpu_passes_against_golden_and_npu_is_not_run(golden_dir):
    report = golden.run(["cpu", "npu"], golden_dir, known_failures=[])
    by_backend = {}
    for case in report["cases"]:
        by_backend.setdefault(case["backend"], set()).add(case["status"])
    assert by_backend == {"cpu": {status.PASS}, "npu": {status.NOT_RUN}}
    npu_messages = {c["message"] for c in report["cases"] if c["backend"] == "npu"}
    assert npu_messages == {registry.probe("npu").detail}


def test_checks_read_the_stored_outputs(golden_dir):
    index = golden.load_index(golden_dir)
    entry = next(e for e in index["cases"] if e["op"] == "rotary")
    path = golden_dir / entry["folder"] / "expected.safetensors"
    expected = repro.load(path)
    expected["q_out"] = expected["q_out"] + 1
    repro.save(path, expected)
    report = golden.run(["cpu"], golden_dir, known_failures=[])
    failed = {c["id"] for c in report["cases"] if c["status"] == status.FAIL}
    assert failed == {entry["id"]}


def test_cli_writes_and_checks_golden_data(tmp_path, capsys):
    gold, out = tmp_path / "gold", tmp_path / "out"
    assert cli.main(["conformance", "--case", "paged_gather/int64/*", "--write-golden", str(gold)]) == 0
    assert "golden case(s)" in capsys.readouterr().out
    assert cli.main(["conformance", "--backend", "cpu", "--case", "paged_gather/int64/*", "--golden", str(gold),
                     "--report", str(out), "--no-progress"]) == 0
    report = json.loads((out / "conformance.json").read_text())
    assert report["runs"][0]["options"]["golden"] == str(gold)
    assert report["cases"] and {c["status"] for c in report["cases"]} == {status.PASS}
