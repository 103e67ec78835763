"""Out-of-tree backends (entry points): discovery, failures, name clashes, hanging probes, new devices."""

import importlib.metadata
import threading
import time

import pytest
import torch

import apt_hal
from apt_hal import cli, ops, registry
from apt_hal.errors import PluginError

SEVEN = {"cpu", "cuda-triton", "rocm", "xpu", "hpu", "npu", "huawei-cloud"}


def _rotary_args():
    torch.manual_seed(0)
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    return q, k, torch.tensor([[0, 2, 1]]), torch.randn(4, 8), "neox"


class _EP:
    """Stands for an importlib.metadata.EntryPoint."""

    def __init__(self, name, value, obj=None, exc=None):
        self.name, self.value, self._obj, self._exc = name, value, obj, exc

    def load(self):
        if self._exc:
            raise self._exc
        return self._obj


@pytest.fixture
def fresh_discovery(monkeypatch):
    """Run discovery again with stand-in entry points; the registry's tables are restored after."""
    monkeypatch.setattr(registry, "_backends", {})
    monkeypatch.setattr(registry, "_origins", {})
    monkeypatch.setattr(registry, "_plugin_errors", [])
    monkeypatch.setattr(registry, "_discovered", False)

    def install(eps):
        monkeypatch.setattr(importlib.metadata, "entry_points",
                            lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])

    yield install
    registry._forget_resolutions()


def test_plugin_backend_is_discovered(fresh_discovery):
    decl = registry.Backend(name="acme", device_type="cpu", probe=lambda: registry.Probe(False, "no ACME card"),
                            implementations="acme_hal.impls", install_hint="pip install acme-hal")
    fresh_discovery([_EP("acme", "acme_hal:BACKEND", obj=decl)])
    assert registry.backends()["acme"] is decl
    assert "no ACME card" in str(apt_hal.explain())


def test_plugin_given_as_a_factory(fresh_discovery):
    decl = registry.Backend(name="acme2", device_type="cpu", probe=lambda: registry.Probe(False, "x"),
                            implementations="m")
    fresh_discovery([_EP("acme2", "acme_hal:declare", obj=lambda: decl)])
    assert "acme2" in registry.backends()


def test_failing_plugin_is_reported_with_its_traceback(fresh_discovery):
    fresh_discovery([_EP("broken", "broken_hal:BACKEND", exc=ImportError("No module named 'broken_hal'"))])
    with pytest.warns(RuntimeWarning, match="failed to load"):
        names = registry.backends()
    assert SEVEN <= set(names)  # the built-ins still work
    (where, tb), = registry.plugin_errors()
    assert "broken" in where and "ImportError" in tb and "broken_hal" in tb
    assert "No module named 'broken_hal'" in str(apt_hal.explain())


def test_a_plugin_claiming_a_builtin_name_is_reported_and_the_builtin_kept(fresh_discovery, capsys):
    dup = registry.Backend(name="cpu", device_type="cpu", probe=lambda: registry.Probe(True, "x"), implementations="m")
    fresh_discovery([_EP("evil", "evil:BACKEND", obj=dup)])
    args = _rotary_args()
    with pytest.warns(RuntimeWarning, match="entry point 'evil' .* failed to load: PluginError: two backends"):
        first = ops.rotary(*args)  # the op call that discovers the plugins must not raise
    second = ops.rotary(*args)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert registry.backends()["cpu"] is not dup
    (where, problem), = registry.plugin_errors()
    assert "evil" in where
    assert "two backends claim the name 'cpu': built-in and entry point 'evil'" in problem
    assert "the first, from built-in, is kept" in str(apt_hal.explain())
    assert cli.main(["info"]) == 0
    assert "plugin entry point 'evil' (evil:BACKEND) failed to load" in capsys.readouterr().out


def test_declaring_a_taken_name_directly_is_an_error():
    dup = registry.Backend(name="cpu", device_type="cpu", probe=lambda: registry.Probe(True, "x"), implementations="m")
    with pytest.raises(PluginError, match="two backends claim the name 'cpu': built-in and tests"):
        registry.register_backend(dup, origin="tests")


def _declare(name, probe, **fields):
    return registry.Backend(name=name, probe=probe, implementations=fields.pop("implementations", "builtins"),
                            device_type=fields.pop("device_type", "cpu"), **fields)


@pytest.fixture
def release():
    """An event that hanging probes wait on; set afterwards so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def test_a_probe_that_never_returns_times_out(fresh_discovery, monkeypatch, release, capsys):
    monkeypatch.setenv("APT_HAL_PROBE_TIMEOUT", "0.5")
    hang = _declare("hang", lambda: release.wait() and registry.Probe(True, "late"), auto_rank=0)
    fresh_discovery([_EP("hang", "hang_hal:BACKEND", obj=hang)])
    args = _rotary_args()
    t0 = time.perf_counter()
    out = ops.rotary(*args)  # under auto, the first call probes every backend
    waited = time.perf_counter() - t0
    assert 0.5 <= waited < 5, waited
    for o, e in zip(out, ops.rotary.reference(*args)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    assert registry.probe("hang") == registry.Probe(False, "probe timed out after 0.5 s")
    t0 = time.perf_counter()  # a probe still running is never waited for again
    assert registry.probe("hang", refresh=True).detail == "probe timed out after 0.5 s"
    registry._reset_for_tests()
    assert registry.probe("hang").detail == "probe timed out after 0.5 s"
    assert time.perf_counter() - t0 < 0.5
    assert cli.main(["info"]) == 0
    assert "probe timed out after 0.5 s" in capsys.readouterr().out


def test_a_probe_that_overran_is_asked_again_once_it_returned(fresh_discovery, monkeypatch, release):
    monkeypatch.setenv("APT_HAL_PROBE_TIMEOUT", "0.2")
    slow = _declare("slow", lambda: release.wait() and registry.Probe(True, "ready now"))
    fresh_discovery([_EP("slow", "slow_hal:BACKEND", obj=slow)])
    assert registry.probe("slow").detail == "probe timed out after 0.2 s"
    release.set()
    registry._overrun_probes["slow"][0].join(5)
    assert registry.probe("slow", refresh=True) == registry.Probe(True, "ready now")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_the_probe_timeout_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv("APT_HAL_PROBE_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"APT_HAL_PROBE_TIMEOUT must be a positive number of seconds, got '{value}'"):
        registry.probe("cpu")


def test_a_plugin_on_a_new_device_type_with_the_best_rank_is_chosen_by_auto(fresh_discovery):
    fake = _declare("fake-accel", lambda: registry.Probe(True, "one fake accelerator"), device_type="fakeaccel",
                    auto_rank=-1)
    fresh_discovery([_EP("fake-accel", "fake_hal:BACKEND", obj=fake)])
    assert apt_hal.device_type() == "fakeaccel"
    assert registry.auto_backends()[0] == "fake-accel"
    row = next(r for r in apt_hal.explain().ops if r["op"] == "rotary")
    assert row["fake-accel"] == "reference (fallback) *"  # the pick for its own device's inputs
    assert row["cpu"].endswith(" *")  # CPU tensors still go to the cpu backend
    with apt_hal.use("cpu"):
        assert apt_hal.device_type() == "cpu"


def test_a_plugin_ranked_behind_the_builtins_is_not_the_device(fresh_discovery):
    fake = _declare("fake-accel", lambda: registry.Probe(True, "one fake accelerator"), device_type="fakeaccel",
                    auto_rank=60)
    fresh_discovery([_EP("fake-accel", "fake_hal:BACKEND", obj=fake)])
    assert registry.auto_backends()[-1] == "fake-accel"
    assert apt_hal.device_type() == registry.device_type_of(registry.auto_backends()[0]) != "fakeaccel"


def test_conformance_reports_record_the_versions_of_every_backends_packages(fresh_discovery):
    from apt_hal.conformance import runner

    declares_pytest = _declare("needs-pytest", lambda: registry.Probe(False, "x"), packages=("pytest",))
    fresh_discovery([_EP("needs-pytest", "p:BACKEND", obj=declares_pytest)])
    versions = runner.environment()["packages"]
    assert versions["pytest"] == importlib.metadata.version("pytest")
    assert versions["triton"] == importlib.metadata.version("triton")  # cuda-triton's declaration
