"""Replay a fixed-shape step as one device graph, on any device that has graph capture.

A decode step of a small model is launch-bound: on an H100 a 1B model's token needs about a
millisecond of memory traffic but several hundred kernel launches from Python, which take tens of
milliseconds. A device graph records those launches once and replays them with one call.
:class:`StepGraph` does this through the device's own graph API, found by one naming rule that
torch and its device plug-ins follow: ``torch.<type>.<TYPE>Graph`` with the ``torch.<type>.graph``
capture context. That is CUDA graphs on NVIDIA (``torch.cuda.CUDAGraph``), HIP graphs on ROCm
(same module), XPU graphs (``torch.xpu.XPUGraph``) and NPU graphs (torch_npu's
``torch.npu.NPUGraph``); of these only CUDA graphs have been run (on an H100). A device without
one (the CPU; Gaudi, whose HPU graphs are a different API) runs the step eagerly: same results,
no speed-up; :attr:`StepGraph.mode` says which.

    step = apt_hal.graphs.StepGraph(decode_step)   # decode_step(tokens) -> logits
    logits = step(tokens)                          # 1st call per input signature: eager (warm-up)
    logits = step(tokens)                          # 2nd: captured, then replayed; later: replayed

The contract a captured function must keep (PyTorch's CUDA-graph rules, written for any device):

* Its tensor arguments are copied into static input buffers before each replay; everything else
  it reads (weights, a KV-cache pool, a block table, a length counter) must stay at the same
  address between calls, and state that changes must change in place (``copy_``, ``add_``), not
  by rebinding a Python attribute to a new tensor.
* It must not synchronise with the host (``.item()``, ``.tolist()``, a data-dependent shape).
  apt_hal's value checks (index ranges, NaN; see ``apt_hal.contract.value_checks_enabled``) are
  off while capturing: the eager first call checked the same step, and a replay reads no values
  on the host. A capture that fails anyway falls back to eager for that input signature, with a
  warning naming the error.
* The returned tensors are the graph's static outputs: the next call overwrites them. Use or copy
  them before calling again.
* ``step.fn`` may be rebound between calls (generate rebinds it per call, so that a step kept
  between calls does not hold the model): a captured signature replays what was recorded, so the
  new function must compute the same step on the same tensors.

The first call runs eagerly on purpose: it compiles kernels and fills caches that capture cannot
(a host-to-device copy is not allowed while capturing), and it is a real step, so a stateful
function (a decode step advancing a KV cache) is never run for warm-up only.

``APT_HAL_GRAPHS=0`` turns capture off everywhere (to compare, or to debug a step).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from apt_hal.contract import capturing_graph


def graph_api(device) -> tuple:
    """``(graph class, capture context, graph pool function)`` of ``device``'s type, or
    ``(None, None, None)`` with no graph capture there; see the module docstring."""
    dev_type = torch.device(device).type
    if dev_type == "cpu":
        return None, None, None
    try:
        module = torch.get_device_module(dev_type)
    except (RuntimeError, AttributeError):
        return None, None, None
    graph_class = getattr(module, f"{dev_type.upper()}Graph", None)
    capture = getattr(module, "graph", None)
    if graph_class is None or capture is None:
        return None, None, None
    return graph_class, capture, getattr(module, "graph_pool_handle", None)


def graphs_enabled() -> bool:
    """False when ``APT_HAL_GRAPHS`` is ``0`` (or ``false``/``off``/``no``)."""
    return os.environ.get("APT_HAL_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")


def _release_generators(device: torch.device) -> None:
    """Give the device's default random generator a state that is not marked as capturing.

    Capture registers the generator; a capture that fails never reaches the step that unregisters
    it, and every later random op on the device then fails with "Offset increment outside graph
    capture" (seen with torch 2.11 on an H100). A clone of the state (same seed and offset, not
    capturing) put back with ``graphsafe_set_state`` repairs it, so the random stream continues.
    """
    try:
        module = torch.get_device_module(device.type)
        generator = module.default_generators[device.index if device.index is not None else module.current_device()]
        generator.graphsafe_set_state(generator.clone_state())
    except (AttributeError, RuntimeError, IndexError):
        pass  # a device without graph-safe generator states: nothing was registered


class _Captured:
    """One input signature's graph, its static inputs and its static outputs."""

    def __init__(self, graph, inputs: tuple, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    def __call__(self, args: tuple):
        for static, new in zip(self.inputs, args):
            static.copy_(new)
        self.graph.replay()
        return self.outputs


class StepGraph:
    """``fn(*tensors)`` (tensors in, a tensor or a tuple of tensors out), replayed as a device graph
    per input signature (shapes, dtypes, devices) where the device has graph capture.

    ``enabled=False`` (or ``APT_HAL_GRAPHS=0``) always runs ``fn`` eagerly. :attr:`mode` is
    ``"graph"`` once a signature has been captured, ``"eager: <why>"`` otherwise.
    """

    def __init__(self, fn: Callable, *, enabled: bool = True):
        self.fn = fn
        self.enabled = enabled and graphs_enabled()
        self.mode = "eager: nothing captured yet" if self.enabled else "eager: graphs turned off"
        self._entries: dict = {}  # signature -> "warm" | "eager" | _Captured
        self._pool = None

    def __call__(self, *args: torch.Tensor):
        if not self.enabled:
            return self.fn(*args)
        key = tuple((a.shape, a.dtype, a.device) for a in args)
        entry = self._entries.get(key)
        if isinstance(entry, _Captured):
            return entry(args)
        if entry is None:
            graph_class, _, _ = graph_api(args[0].device) if args else (None, None, None)
            if graph_class is None:
                self._entries[key] = "eager"
                self.mode = f"eager: no graph capture on {args[0].device.type if args else 'no inputs'}"
            else:
                self._entries[key] = "warm"
            return self.fn(*args)  # the warm-up is a real step
        if entry == "eager":
            return self.fn(*args)
        captured = self._capture(args)
        if captured is None:
            self._entries[key] = "eager"
            return self.fn(*args)
        self._entries[key] = captured
        self.mode = "graph"
        return captured(args)

    def _capture(self, args: tuple) -> Optional[_Captured]:
        graph_class, capture, pool_handle = graph_api(args[0].device)
        inputs = tuple(a.clone() for a in args)
        if self._pool is None and pool_handle is not None:
            self._pool = pool_handle()  # every signature's graph allocates from one pool
        graph = graph_class()
        token = capturing_graph.set(True)  # value checks read tensors on the host: not while capturing
        try:
            with capture(graph, pool=self._pool):
                outputs = self.fn(*inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure: fall back, say why
            _release_generators(args[0].device)
            self.mode = f"eager: capture failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"apt_hal.graphs.StepGraph: {self.mode}; running this step eagerly", RuntimeWarning,
                          stacklevel=3)
            return None
        finally:
            capturing_graph.reset(token)
        return _Captured(graph, inputs, outputs)
