"""Test setup shared by every test file.

* Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be
  set before anything imports triton, so it is set here, first.
* One intra-op thread per test process (see below).
* Each test starts from the default policy ("auto", not strict) and leaves no policy behind.
* Tests marked ``slow`` run only with ``--slow`` (CI passes it; README.md says how long each run takes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs two pytest workers on two cores: one intra-op thread each avoids oversubscription, which
# made small training steps over ten times slower.
torch.set_num_threads(1)

import pytest  # noqa: E402

from apt_hal import registry  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_policy(monkeypatch):
    monkeypatch.delenv("APT_HAL_BACKEND", raising=False)
    monkeypatch.delenv("APT_HAL_STRICT", raising=False)
    registry._reset_for_tests()
    yield
    registry._reset_for_tests()


@pytest.fixture
def dev() -> str:
    """The device kernels run on: the GPU when there is one, else the CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
