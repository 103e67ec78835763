"""The conformance suite: the quick suite on the backends of this machine, a deliberately broken
backend caught, statuses, reports in four formats, repro bundles, determinism, merging, exit codes."""

import collections
import importlib.metadata
import json
import xml.etree.ElementTree as ET

import pytest
import torch

import apt_hal
from apt_hal import ops, registry
from apt_hal.cli import main
from apt_hal.conformance import reports, repro, runner, spec, status, tolerances

BROKEN = "conformance-test"


def _by_id(report, backend):
    return {c["id"]: c for c in report["cases"] if c["backend"] == backend}


def _declare(name, probe, implementations="builtins", claims=None):
    decl = registry.Backend(name=name, device_type="cpu", probe=probe, implementations=implementations,
                            claims=claims or {})
    registry.register_backend(decl, origin="tests/test_conformance.py")


def _forget(name):
    registry.unregister_backend(name)


# ---- the quick suite on this machine's backends -------------------------------------------


@pytest.fixture(scope="module")
def cpu_quick():
    return runner.run(["cpu"], quick=True)


def test_quick_suite_passes_on_cpu_and_covers_every_op(cpu_quick):
    results = cpu_quick["cases"]
    assert cpu_quick["backends"]["cpu"]["status"] == "RAN"
    not_passing = [f"{c['status']} {c['id']}: {c['message']}" for c in results if c["status"] != status.PASS]
    assert not not_passing, "\n".join(not_passing)
    kinds = {(c["op"], c["kind"]) for c in results}
    for op in [o.name for o in ops.ALL_OPS] + ["mxfp4_quantize"]:
        assert (op, "value") in kinds and (op, "error") in kinds, op
    assert len(results) == sum(c.quick for c in spec.all_cases())


def _other_available_backends():
    # conftest.py sets TRITON_INTERPRET=1 without a GPU, so cuda-triton runs here in Triton's interpreter.
    return [n for n in registry.backends() if n != "cpu" and registry.probe(n).available]


@pytest.mark.slow
@pytest.mark.parametrize("backend", _other_available_backends())
def test_quick_suite_on_each_available_backend(backend):
    report = runner.run([backend], quick=True)
    b = report["backends"][backend]
    assert b["status"] == "RAN", b["detail"]
    bad = [f"{c['status']} {c['id']}: {c['message']}" for c in report["cases"]
           if c["status"] in (status.FAIL, status.ERROR, status.INFRA_ERROR, status.XPASS)]
    assert not bad, "\n".join(bad)


# ---- a deliberately broken backend ----------------------------------------------------------


@pytest.fixture
def broken():
    """A backend whose implementations are wrong in known ways, one per status."""
    claims = {op: {"dtypes": ["*"], "features": ["*"]}
              for op in ("rotary", "rotary_", "paged_write", "paged_gather", "moe_route", "moe_combine")}
    claims["fp4_matmul"] = {"dtypes": ["bfloat16"], "features": ["*"]}  # float32/float16: UNSUPPORTED
    _declare(BROKEN, lambda: registry.Probe(True, "test double"), claims=claims)
    strict = tolerances.lookup("rotary", "q_out", "float32", BROKEN).strict

    def fp4_matmul(x, w_packed, w_scales, bias=None):  # the classic bug: nibbles swapped
        swapped = (w_packed >> 4) | (w_packed << 4)
        return ops.fp4_matmul.reference(x, swapped, w_scales, bias)

    def rotary(q, k, positions, cos_sin_cache, style="neox"):  # 2x the strict band: QUALITY_WARNING in fp32
        q_out, k_out = ops.rotary.reference(q, k, positions, cos_sin_cache, style)
        return q_out * (1 + 2 * strict), k_out * (1 + 2 * strict)

    def rotary_(q, k, positions, cos_sin_cache, style="neox"):  # also writes past k's view
        ops.rotary_.reference(q, k, positions, cos_sin_cache, style)
        spec.storage_elements(k)[-1] = 42

    def paged_write(cache, values, slot_mapping):  # forgets that negative slots are skipped
        bs = cache.shape[1]
        cache[slot_mapping // bs, slot_mapping % bs] = values

    def paged_gather(cache, block_table):  # right result, but scribbles on its input
        out = ops.paged_gather.reference(cache, block_table)
        if cache.numel():
            cache.view(torch.uint8).reshape(-1)[0] ^= 1
        return out

    def moe_route(router_logits, top_k, scoring="softmax_topk", renormalize=False):
        raise RuntimeError("kernel exploded")

    entries = [registry.register_impl(op, BROKEN, fn) for op, fn in
               [(ops.fp4_matmul, fp4_matmul), (ops.rotary, rotary), (ops.rotary_, rotary_),
                (ops.paged_write, paged_write), (ops.paged_gather, paged_gather), (ops.moe_route, moe_route)]]
    yield
    for e in entries:
        registry.unregister_impl(e)
    _forget(BROKEN)


KNOWN = [{"backend": BROKEN, "case": "paged_write/uint8/t7_bs4", "reason": "test: a known failure"},
         {"backend": BROKEN, "case": "paged_write/uint8/error_values_dtype", "reason": "test: now passes"}]
BROKEN_OPS = ["fp4_matmul", "rotary", "rotary_", "paged_write", "paged_gather", "moe_route", "moe_combine",
              "moe_permute"]


def test_a_broken_backend_is_caught_with_the_right_status(broken, tmp_path):
    report = runner.run([BROKEN], quick=True, ops=BROKEN_OPS, known_failures=KNOWN, report_dir=tmp_path)
    got = _by_id(report, BROKEN)

    def check(case_id, expected, text=""):
        c = got[case_id]
        assert c["status"] == expected and text in c["message"], (case_id, c["status"], c["message"])

    check("fp4_matmul/bfloat16/m33_k128_n33", status.FAIL, "above the relaxed band")
    check("fp4_matmul/float32/m33_k128_n33", status.UNSUPPORTED, "does not claim fp4_matmul in float32")
    check("rotary/float32/neox_b2_s3_h4_d64", status.QUALITY_WARNING, "above the strict band")
    check("rotary/bfloat16/neox_b2_s3_h4_d64", status.PASS)  # the 2e-6 error vanishes in bf16 rounding
    check("rotary_/bfloat16/strided_qkv", status.FAIL, "memory around 'q', 'k'")
    check("paged_write/uint8/t7_bs4", status.XFAIL, "known failure")
    check("paged_write/bfloat16/t7_bs4", status.FAIL, "differ in their bytes")
    check("paged_write/uint8/error_values_dtype", status.XPASS, "passes")
    check("paged_gather/uint8/table_3x4", status.FAIL, "its input 'cache', which the contract does not mutate")
    check("moe_route/float32/softmax_topk_t7_e8_k2", status.ERROR, "kernel exploded")
    check("moe_combine/float32/t6_e4_k2_d64", status.ERROR, "has no implementation of moe_combine")
    check("moe_permute/int32/dropless_t9_e4_k2", status.UNSUPPORTED, "does not claim moe_permute")
    assert reports.exit_code(report) == status.EXIT_FAILED


def test_a_failure_has_a_bundle_that_rebuilds_its_inputs_exactly(broken, tmp_path):
    case_id = "rotary_/bfloat16/strided_qkv"
    report = runner.run([BROKEN], patterns=[case_id], report_dir=tmp_path)
    record, = report["cases"]
    folder = tmp_path / record["repro"]
    saved = json.loads((folder / "case.json").read_text())
    assert saved["rerun"] == record["rerun"]
    assert f"--case {case_id}" in record["rerun"] and "--seed 0" in record["rerun"]
    case, = runner.select_cases(patterns=[case_id])
    fresh = case.make(spec.generator(0, case_id), case.dtype)
    loaded = repro.load(folder / "inputs.safetensors")
    assert loaded.keys() == fresh.keys()
    for name, value in fresh.items():
        if isinstance(value, torch.Tensor):
            assert loaded[name].stride() == value.stride() and loaded[name].storage_offset() == value.storage_offset()
            assert torch.equal(loaded[name].contiguous().view(torch.uint8), value.contiguous().view(torch.uint8)), name
        else:
            assert loaded[name] == value
    assert loaded["q"].untyped_storage().data_ptr() == loaded["k"].untyped_storage().data_ptr()  # still one qkv buffer
    assert set(repro.load(folder / "actual.safetensors")) == {"q", "k"}
    assert set(repro.load(folder / "expected.safetensors")) == {"q", "k"}


def test_placing_inputs_keeps_layout_and_shared_storage():
    case, = runner.select_cases(patterns=["rotary_/bfloat16/strided_qkv"])
    inputs = case.make(spec.generator(3, case.id), case.dtype)
    placed = spec.place(inputs, torch.device("cpu"))
    for name in ("q", "k"):
        assert placed[name].stride() == inputs[name].stride() and not placed[name].is_contiguous()
        assert torch.equal(placed[name], inputs[name])
        assert placed[name].untyped_storage().data_ptr() != inputs[name].untyped_storage().data_ptr()
    assert placed["q"].untyped_storage().data_ptr() == placed["k"].untyped_storage().data_ptr()


# ---- reports --------------------------------------------------------------------------------


def test_reports_in_four_formats(broken, tmp_path):
    _declare("conformance-absent", lambda: registry.Probe(False, "no Acme accelerator in this machine"))
    try:
        report = runner.run([BROKEN, "cpu", "conformance-absent"], quick=True, ops=["fp4_matmul", "paged_gather"],
                            report_dir=tmp_path)
    finally:
        _forget("conformance-absent")
    paths = reports.write_all(report, tmp_path)
    assert {p.name for p in paths} == set(reports.FILES.values())

    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["schema"] == runner.SCHEMA and data == json.loads(json.dumps(report))
    # The distribution's version: a local build tag (torch.__version__ "2.11.0+cu130") may be absent.
    assert data["runs"][0]["environment"]["packages"]["torch"] == importlib.metadata.version("torch")
    assert {"status", "detail", "device", "driver", "claims"} <= set(data["backends"]["cpu"])
    case = data["cases"][0]
    assert {"backend", "id", "op", "dtype", "status", "message", "outputs", "repro"} <= set(case)
    assert set(data["timing"]) == {"runs", "cases"}

    suites = {s.get("name"): s for s in ET.parse(tmp_path / "junit.xml").getroot()}
    assert set(suites) == {BROKEN, "cpu", "conformance-absent"}
    failures = sum(c["status"] == status.FAIL for c in report["cases"])
    assert int(suites[BROKEN].get("failures")) == len(suites[BROKEN].findall("testcase/failure")) == failures > 0
    skipped = suites["conformance-absent"].findall("testcase/skipped")
    assert skipped and all("no Acme accelerator" in s.get("message") for s in skipped)

    md = (tmp_path / "conformance.md").read_text()
    assert f"| op | dtype | {BROKEN} | cpu | conformance-absent |" in md and "| fp4_matmul | bfloat16 |" in md
    page = (tmp_path / "conformance.html").read_text()
    assert '<table class="matrix">' in page and 'class="cell s-FAIL"' in page and 'class="cell s-NOT_RUN"' in page
    assert "no Acme accelerator in this machine" in page and "<script" not in page and "://" not in page


def _without_timing(report):
    return json.dumps({k: v for k, v in report.items() if k != "timing"}, sort_keys=True)


def test_same_seed_same_report_and_the_seed_matters(broken):
    def go(seed):
        return runner.run([BROKEN, "cpu"], seed=seed, quick=True, ops=["fp4_matmul", "paged_gather"])

    first, again, other = go(0), go(0), go(1)
    assert _without_timing(first) == _without_timing(again)
    def errors(report):  # the nibble-swapped fp4_matmul's errors depend on the inputs
        return [c["outputs"]["y"]["value"] for c in report["cases"] if c["op"] == "fp4_matmul" and c["outputs"]]

    assert errors(first) and errors(first) != errors(other)


def test_unavailable_backends_are_not_run_with_their_reason_and_never_green():
    unavailable = [n for n, b in registry.backends().items() if not b.probe().available]
    assert unavailable  # on any machine some vendor stack is missing (here: torch_npu, habana, ...)
    report = runner.run(unavailable, quick=True, ops=["rotary"])
    for name in unavailable:
        reason = registry.get_backend(name).probe().detail  # e.g. "torch_npu is not installed"
        assert reason and report["backends"][name]["status"] == "NOT_RUN"
        results = {(c["status"], c["message"]) for c in report["cases"] if c["backend"] == name}
        assert results == {(status.NOT_RUN, reason)}
    assert reports.exit_code(report) == 0
    assert reports.exit_code(report, require=unavailable[:1]) == status.EXIT_REQUIRED_NOT_RUN


def test_a_backend_that_fails_to_activate_is_an_infra_error():
    _declare("conformance-crash", lambda: registry.Probe(True, "looks fine"),
             implementations="apt_hal.conformance.no_such_module", claims={"*": {"dtypes": ["*"], "features": ["*"]}})
    try:
        report = runner.run(["conformance-crash"], quick=True, ops=["moe_permute"])
    finally:
        _forget("conformance-crash")
    b = report["backends"]["conformance-crash"]
    assert b["status"] == "INFRA_ERROR" and "no_such_module" in b["detail"]
    assert {c["status"] for c in report["cases"]} == {status.INFRA_ERROR}
    assert reports.exit_code(report) == status.EXIT_INFRA


def test_results_do_not_depend_on_the_callers_check_level():
    previous = apt_hal.set_checks("none")  # a caller's hot-loop setting must not leak into conformance
    try:
        report = runner.run(["cpu"], quick=True, ops=["paged_write", "rotary"])
    finally:
        apt_hal.set_checks(previous)
    assert {c["status"] for c in report["cases"]} == {status.PASS}


# ---- claims, cases, tolerances ------------------------------------------------------------


def test_case_specs_and_claims_use_one_vocabulary():
    specs = spec.op_specs()
    assert set(specs) == {o.name for o in ops.ALL_OPS} | {"mxfp4_quantize"}
    ids = [c.id for c in spec.all_cases()]
    assert len(ids) == len(set(ids))
    for name, s in specs.items():
        cases = s.cases()
        used = {f for c in cases for f in c.features}
        assert used == set(s.features), (name, used ^ set(s.features))  # every feature has a case, no stray ones
        assert any(c.quick and not c.is_error for c in cases) and any(c.is_error for c in cases)
    for backend in ("cpu", "cuda-triton"):
        claims = registry.get_backend(backend).claims
        assert runner.claim_warnings(claims, specs) == []
        assert all(runner.claim_gap(claims, c) is None for c in spec.all_cases()), backend  # both claim everything


def test_tolerance_table_every_entry_has_a_reason_and_the_most_specific_wins():
    entries = tolerances.table()
    assert all(len(t.reason) > 20 for t in entries)
    assert tolerances.lookup("paged_gather", "blocks", "bfloat16", "npu").metric == "exact"
    assert tolerances.lookup("moe_route", "topk_ids", "float16", "cpu").metric == "exact"
    weights = tolerances.lookup("moe_route", "topk_weights", "float16", "cpu")
    assert weights.metric == "rel_inf" and weights.key[0] == "moe_route"
    assert tolerances.lookup("rotary_", "q", "bfloat16", "xpu").key == ("rotary*", "*", "bfloat16", "*")
    assert tolerances.lookup("new_op", "out", "float32", "cpu").key == ("*", "*", "*", "*")  # exact by default
    mm = tolerances.lookup("fp4_matmul", "y", "float32", "cpu")
    assert mm.bands(400) == pytest.approx((mm.strict * 20, mm.relaxed * 20))


def _verdict(got, expected, tol):
    return tolerances.compare(torch.tensor(got), torch.tensor(expected), tol)[0]


def test_nan_never_passes_by_accident_and_bands_classify():
    tol = tolerances.lookup("rotary", "q_out", "float32", "cpu")
    nan, inf = float("nan"), float("inf")
    assert _verdict([1.0, nan, inf, -inf], [1.0, nan, inf, -inf], tol) == status.PASS  # NaN where the reference has NaN
    assert _verdict([1.0, nan, 3.0], [1.0, 2.0, 3.0], tol) == status.FAIL  # NaN elsewhere
    assert _verdict([1.0, 2.0, 3.0], [1.0, nan, 3.0], tol) == status.FAIL  # a number where the reference has NaN
    assert _verdict([1.0, -inf], [1.0, inf], tol) == status.FAIL
    assert _verdict([1.0, 3e38], [1.0, inf], tol) == status.FAIL
    scale = 4.0
    for factor, expected in [(0.5, status.PASS), (2.0, status.QUALITY_WARNING), (8.0, status.FAIL)]:
        delta = factor * tol.strict * scale
        assert _verdict([scale + delta, 1.0], [scale, 1.0], tol) == expected, factor
    exact = tolerances.lookup("paged_write", "cache", "float32", "cpu")
    assert _verdict([0.0, nan], [0.0, nan], exact) == status.PASS
    assert _verdict([-0.0], [0.0], exact) == status.FAIL  # bytes: the sign of zero counts
    assert _verdict([1.0, 2.0], [1.0], exact) == status.FAIL  # shape


# ---- the command line -----------------------------------------------------------------------


def _cli(*args):
    return main(["conformance", "--no-progress", *map(str, args)])


def test_exit_codes(broken, tmp_path, capsys):
    assert _cli("--backend", "cpu", "--quick", "--op", "moe_permute,moe_combine", "--report", tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "moe_permute" in out and "exit code 0" in out and (tmp_path / "a" / "conformance.html").exists()
    assert _cli("--backend", BROKEN, "--quick", "--op", "paged_write", "--report", tmp_path / "b") == status.EXIT_FAILED
    assert _cli("--backend", "cpu", "--case", "moe_permute/int32/capacity3", "--require", BROKEN,
                "--report", tmp_path / "c") == status.EXIT_REQUIRED_NOT_RUN
    assert _cli("--backend", "no-such-backend", "--report", tmp_path / "d") == 2
    assert _cli("--backend", "cpu", "--op", "no_such_op", "--report", tmp_path / "d") == 2
    with pytest.raises(SystemExit) as usage:
        _cli("--seed", "abc")
    assert usage.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as shown:
        _cli("--help")
    text = capsys.readouterr().out
    assert shown.value.code == 0 and "exit codes" in text and "apt-hal conformance --backend all --report out/" in text


def test_merge_builds_one_matrix_and_requires_backends(broken, tmp_path):
    assert _cli("--backend", "cpu", "--quick", "--op", "rotary", "--report", tmp_path / "cpu") == 0
    assert _cli("--backend", BROKEN, "--quick", "--op", "rotary", "--report", tmp_path / "broken") == 0
    assert _cli("--merge", tmp_path / "cpu", tmp_path / "broken", "--require", f"cpu,{BROKEN}",
                "--report", tmp_path / "all") == 0
    merged = reports.load(tmp_path / "all")
    assert list(merged["backends"]) == ["cpu", BROKEN] and len(merged["runs"]) == 2
    counts = collections.Counter(c["backend"] for c in merged["cases"])
    assert counts["cpu"] == counts[BROKEN] > 0
    assert "| op | dtype | cpu | conformance-test |" in (tmp_path / "all" / "conformance.md").read_text()
    assert _cli("--merge", tmp_path / "cpu", "--require", f"cpu,{BROKEN}", "--report", tmp_path / "m1") == \
        status.EXIT_REQUIRED_NOT_RUN
    assert _cli("--merge", tmp_path / "cpu", tmp_path / "missing", "--report", tmp_path / "m2") == status.EXIT_INFRA
    assert _cli("--merge", tmp_path / "cpu", tmp_path / "cpu", "--report", tmp_path / "m3") == 2  # cpu ran twice
