"""apt_hal.graphs.StepGraph: eager where the device has no graph capture, captured and replayed
where it has; a capture that fails falls back to eager with a warning; generation gives the same
tokens with and without graphs."""

import copy

import pytest
import torch

import apt_hal
from apt_hal.graphs import StepGraph, graph_api
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate

GPU = torch.cuda.is_available()


def test_the_graph_api_is_found_by_the_device_naming_rule():
    assert graph_api("cpu") == (None, None, None)
    graph_class, capture, _ = graph_api("cuda")  # the classes exist in CPU builds of torch too
    assert graph_class is torch.cuda.CUDAGraph and capture is torch.cuda.graph


def test_on_the_cpu_a_step_runs_eagerly_and_says_why():
    calls = []

    def step(x):
        calls.append(1)
        return x * 2

    graphed = StepGraph(step)
    for i in range(3):
        assert torch.equal(graphed(torch.full((2,), float(i))), torch.full((2,), 2.0 * i))
    assert len(calls) == 3 and graphed.mode == "eager: no graph capture on cpu"


def test_graphs_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("APT_HAL_GRAPHS", "0")
    assert StepGraph(lambda x: x).mode == "eager: graphs turned off"


class _FailingCapture:
    """A device graph API whose capture raises, as CUDA's does when the step syncs with the host."""

    class Graph:
        pass

    @staticmethod
    def capture(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(apt_hal.graphs, "graph_api", lambda device: (_FailingCapture.Graph, _FailingCapture.capture,
                                                                     None))
    graphed = StepGraph(lambda x: x + 1)
    x = torch.ones(3)
    assert torch.equal(graphed(x), x + 1)  # first call: eager warm-up, nothing captured
    with pytest.warns(RuntimeWarning, match="capture failed .*not permitted when stream is capturing"):
        assert torch.equal(graphed(x), x + 1)
    assert torch.equal(graphed(x * 5), x * 5 + 1)  # this signature stays eager, without warning again
    assert graphed.mode.startswith("eager: capture failed")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="graph capture needs a CUDA GPU")
def test_a_captured_step_replays_with_new_inputs_and_in_place_state():
    counter = torch.zeros(1, device="cuda")

    def step(x):
        counter.add_(1)  # state advanced in place: every replay must advance it
        return x * counter

    graphed = StepGraph(step)
    outs = [graphed(torch.full((4,), float(i), device="cuda")).clone() for i in range(1, 5)]
    assert graphed.mode == "graph"
    assert [o[0].item() for o in outs] == [1.0, 4.0, 9.0, 16.0]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="graph capture needs a CUDA GPU")
def test_a_step_that_syncs_falls_back_and_leaves_the_random_generator_usable():
    def step(x):
        return x + 1 if x.sum().item() > 0 else x  # .item() is a host sync: capture must fail

    graphed = StepGraph(step)
    x = torch.ones(4, device="cuda")
    graphed(x)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(graphed(x), x + 1)
    assert graphed.mode.startswith("eager: capture failed")
    # Without the repair every random op on the device now fails ("Offset increment outside graph capture").
    assert torch.multinomial(torch.ones(2, 5, device="cuda"), 1).shape == (2, 1)
    assert torch.rand(3, device="cuda").shape == (3,)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="graph capture needs a CUDA GPU")
@pytest.mark.parametrize("family", ["dense", "moe", "oss", "seq2seq"])
def test_generation_with_graphs_equals_generation_without(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(f"apt-{family}-tiny", init_std=0.1)).to("cuda")
    prompts = [[5, 17, 300, 2, 9, 41, 8], [100], [7, 7, 200, 31]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=20, greedy=True, graphs=False))
    graphed = generate(copy.deepcopy(model), prompts, GenerationConfig(max_new_tokens=20, greedy=True))
    assert graphed == eager
    sampled = [generate(model, prompts, GenerationConfig(max_new_tokens=20, seed=3, graphs=g)) for g in (False, True)]
    assert sampled[0] == sampled[1]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="graph capture needs a CUDA GPU")
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_a_kept_decode_graph_replays_from_the_first_step_of_the_next_call(family, monkeypatch):
    import dataclasses

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(f"apt-{family}-tiny", init_std=0.1)).to("cuda")
    prompts = [[5, 17, 300, 2, 9, 41, 8], [100], [7, 7, 200, 31]]
    config = GenerationConfig(max_new_tokens=20, greedy=True)
    eager = dataclasses.replace(config, graphs=False)
    captures = []
    capture = StepGraph._capture
    monkeypatch.setattr(StepGraph, "_capture", lambda self, args: captures.append(1) or capture(self, args))
    expected = generate(copy.deepcopy(model), prompts, eager)
    assert generate(model, prompts, config) == expected
    assert generate(model, prompts, config) == expected  # every decode step a replay of the first call's graph
    assert captures == [1]
    # A replaced weight is a new tensor the kept graph does not read: a new session captures again.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    assert generate(model, prompts, config) == generate(copy.deepcopy(model), prompts, eager)
    assert captures == [1, 1]
