"""The backend policy: apt_hal.use as a statement (process-wide) and as a with block (scoped only),
under thread contention; unknown and unavailable names from code and from the environment."""

import random
import sys
import threading

import pytest
import torch

import apt_hal
from apt_hal import ops, registry
from apt_hal.errors import BackendError, BackendUnavailableError, UnknownBackendError

CHOICES = [registry.Policy("cpu", False), registry.Policy("cpu", True), registry.Policy("auto", True)]


def _rotary_args():
    torch.manual_seed(0)
    return torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), torch.tensor([[0, 2, 1]]), torch.randn(4, 8), "neox"


@pytest.fixture
def fast_switching():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _scoped_blocks(seed: int, rounds: int, wrong: list, start: threading.Barrier) -> None:
    rng = random.Random(seed)
    start.wait()
    for _ in range(rounds):
        pol = rng.choice(CHOICES)
        with apt_hal.use(pol.backend, strict=pol.strict):
            if registry.current_policy() != pol:
                wrong.append(registry.current_policy())


def _contended_run(seed: int) -> tuple[set, list]:
    """Eight threads in with blocks while a ninth reads the process-wide policy the whole time."""
    seen, wrong, done, start = set(), [], threading.Event(), threading.Barrier(9)

    def watch():
        start.wait()
        while not done.is_set():
            seen.add(registry._global_policy)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=_scoped_blocks, args=(seed * 8 + i, 5000, wrong, start)) for i in range(8)]
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    return seen, wrong


@pytest.mark.usefixtures("fast_switching")
def test_with_blocks_in_eight_threads_never_touch_the_process_policy():
    apt_hal.use("auto")
    process = registry.current_policy()
    for run in range(4):
        seen, wrong = _contended_run(run)
        assert wrong == [], run  # each block saw its own policy
        assert seen == {process}, run  # not even for an instant
        assert registry.current_policy() == process, run


def test_a_plain_call_is_process_wide_at_once():
    apt_hal.use("cpu", strict=True)
    seen = []
    t = threading.Thread(target=lambda: seen.append(registry.current_policy()))
    t.start()
    t.join()
    assert seen == [registry.Policy("cpu", True)]


def test_a_kept_use_object_applies_at_the_threads_next_call():
    chosen = apt_hal.use("cpu", strict=True)  # kept, never entered: a plain call after all
    assert registry.current_policy() == registry.Policy("cpu", True)
    assert repr(chosen) == "apt_hal.use('cpu', strict=True)"
    later = apt_hal.use("auto")  # applies only once it is known not to be entered
    with apt_hal.use("cpu"):
        pass
    del later
    assert registry.current_policy() == registry.Policy("auto", False)


def test_a_block_inside_a_thread_leaves_other_threads_alone():
    inside, release = threading.Event(), threading.Event()

    def scoped():
        with apt_hal.use("cpu", strict=True):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=scoped)
    t.start()
    inside.wait(10)
    try:
        assert registry.current_policy() == registry.Policy("auto", False)
    finally:
        release.set()
        t.join()


# ---- unknown and unavailable names ---------------------------------------------------------


def test_one_base_class_catches_unknown_and_unavailable_backends():
    assert issubclass(UnknownBackendError, BackendError) and issubclass(BackendUnavailableError, BackendError)
    assert issubclass(BackendError, apt_hal.AptHalError) and apt_hal.BackendError is BackendError
    with pytest.raises(BackendError):
        apt_hal.use("cuda")


@pytest.mark.parametrize("name, close", [("cuda", "did you mean 'cuda-triton'?"),
                                         ("cpus", "did you mean 'cpu'?"),
                                         ("autoo", "did you mean 'auto'?"),
                                         ("rocm6", "did you mean 'rocm'?")])
def test_an_unknown_name_suggests_the_closest_known_ones(name, close):
    with pytest.raises(UnknownBackendError) as e:
        apt_hal.use(name)
    message = str(e.value)
    assert message.startswith(f"unknown backend {name!r}; {close} known: ") and message.endswith(" (or 'auto')")
    assert "\n" not in message


def test_or_auto_only_where_auto_is_accepted():
    with pytest.raises(UnknownBackendError) as e:
        registry.get_backend("cuda")
    assert str(e.value).startswith("unknown backend 'cuda'; did you mean 'cuda-triton'? known: cuda-triton, ")
    assert "auto" not in str(e.value)
    with pytest.raises(UnknownBackendError, match=r"known: .*\(or 'all'\)$"):
        raise registry.unknown_backend_error("nope", also=("all",))


@pytest.mark.parametrize("name, error, start", [
    ("cuda", UnknownBackendError, "APT_HAL_BACKEND: unknown backend 'cuda'; did you mean 'cuda-triton'? known: "),
    ("npu", BackendUnavailableError, "APT_HAL_BACKEND: backend 'npu' is unavailable: torch_npu is not installed."),
])
def test_a_bad_backend_in_the_environment_is_one_line_naming_the_variable(monkeypatch, name, error, start):
    if name == "npu" and registry.probe("npu").available:
        pytest.skip("this machine has an Ascend NPU")
    monkeypatch.setenv("APT_HAL_BACKEND", name)
    registry._reset_for_tests()
    with pytest.raises(error) as e:
        ops.rotary(*_rotary_args())
    assert str(e.value).startswith(start)
    assert "\n" not in str(e.value)


@pytest.fixture
def failing_remote():
    """A remote backend whose rotary raises BackendCallError (a server gone mid-call)."""
    name = "failing-remote"
    registry.register_backend(registry.Backend(name=name, device_type="cpu", implementations="builtins",
                                               probe=lambda: registry.Probe(True, "test double"), remote=True))
    registry.activate(name)

    def rotary(q, k, positions, cos_sin_cache, style="neox"):
        raise apt_hal.BackendCallError("huawei-cloud server http://127.0.0.1:9: connection refused")

    registry.register_impl(ops.rotary, name, rotary)
    yield name
    registry.unregister_backend(name)


def test_a_failed_backend_call_falls_back_to_the_reference_with_one_warning(failing_remote):
    args = _rotary_args()
    with apt_hal.use(failing_remote):
        with pytest.warns(RuntimeWarning, match="rotary falls back to the reference .*connection refused"):
            q, k = ops.rotary(*args)
        expected = ops.rotary.reference(*args)
        assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_a_failed_backend_call_raises_under_strict(failing_remote):
    with apt_hal.use(failing_remote, strict=True):
        with pytest.raises(apt_hal.BackendCallError, match="connection refused"):
            ops.rotary(*_rotary_args())


def test_a_remote_backend_takes_tensors_of_any_device(failing_remote):
    # Meta tensors stand for an accelerator's: the remote implementation is chosen, not the local reference.
    assert registry._resolve("rotary", "meta", registry.Policy(failing_remote)).candidates
