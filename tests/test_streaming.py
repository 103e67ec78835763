"""Weight streaming (apt_hal.models.streaming): layers in a PagedTensor under a device budget give
bit-identical weights from every tier and exactly the greedy tokens of the model without a budget."""

import copy

import pytest
import torch

import apt_hal.graphs
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.streaming import is_streamed, moved_in, parse_memory, stream_weights
from apt_hal.nn import convert_model_to_mxfp4

LAYERS = 4


def _model(preset: str, weights: str):
    torch.manual_seed(0)
    moe_fp4 = weights == "mxfp4" and "moe" in preset
    model = build_model(ModelConfig.preset(preset, dtype="bfloat16", n_layers=LAYERS, mxfp4_experts=moe_fp4)).eval()
    if weights == "mxfp4" and not moe_fp4:
        convert_model_to_mxfp4(model)
    return model


def _sizes(model) -> tuple[int, int]:
    """(bytes of the weights outside the layers, bytes of one layer's block)."""
    probe = stream_weights(copy.deepcopy(model), "100%")
    probe.close()
    return probe.resident_bytes, probe.layer_bytes


# (device layers, host layers or None for every other layer); disk holds the rest.
PLACEMENTS = [(1, None), (2, None), (3, None), (2, 1), (3, 0), (LAYERS, None)]


@pytest.mark.parametrize("weights", ["bf16", "mxfp4"])
@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny"])
def test_greedy_tokens_with_a_budget_equal_those_without(preset, weights, tmp_path):
    model = _model(preset, weights)
    prompts, config = [[1, 2, 3, 4, 5], [7, 8]], GenerationConfig(max_new_tokens=10, greedy=True)
    expected = generate(model, prompts, config)
    resident, layer = _sizes(model)
    for device_layers, host_layers in PLACEMENTS:
        streamed = copy.deepcopy(model)
        stream = stream_weights(streamed, resident + device_layers * layer,
                                host_memory=None if host_layers is None else host_layers * layer or 1,
                                disk_path=str(tmp_path / f"weights-{device_layers}-{host_layers}.bin"))
        assert is_streamed(streamed)
        built = stream.stats()
        assert generate(streamed, prompts, config) == expected, (device_layers, host_layers)
        stats = stream.stats()
        assert stats["device_layers"] == device_layers
        moved = stats["store"]["moved"]
        if device_layers == LAYERS:  # bound once, no hooks: nothing runs through the store
            assert not stream.moves_weights
            assert moved == {} and stats["layer_runs"] == 0 and stats["hit_rate"] == 1.0
        else:
            assert stream.moves_weights
            assert stats["layer_runs"] == LAYERS * 10  # the prompt pass and 9 decode steps
            assert moved_in(stats["store"]) > 0
            # Layers go back to their kept copies: no bytes leave the device while generating.
            assert stats["bytes_written_back"] == built["bytes_written_back"]
            assert sum(stats["store"]["dropped"].values()) > 0
        if host_layers is not None and device_layers < LAYERS:
            assert any(route.startswith("disk->") for route in moved)
        stream.close()


@pytest.mark.parametrize("weights", ["bf16", "mxfp4"])
def test_layers_read_back_bit_identical_from_every_tier(weights, tmp_path):
    model = _model("apt-moe-tiny", weights)
    originals = [{name: t.clone() for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
                 for layer in model.layers]
    resident, layer = _sizes(model)
    stream = stream_weights(model, resident + layer, host_memory=layer, disk_path=str(tmp_path / "w.bin"))
    store = stream.store
    # Every layer has a home copy below the device: 1 on the host (layer 0, also on the device), 3 on disk.
    assert sorted(store.tier_of(block_id) for block_id in stream.ids) == ["device", "disk", "disk", "disk"]
    assert store.stats()["host"]["kept"] == 1
    for i, block_id in enumerate(stream.ids):
        for tier in ("device", "disk", "host"):  # in this order, the one free (disk) slot is enough
            store.device_slots([block_id])
            if tier != "device":
                store.evict([block_id], tier)
            assert store.tier_of(block_id) == tier
            unpacked = stream.unpack(stream.read_layer(i))
            assert unpacked.keys() == originals[i].keys()
            for name, tensor in originals[i].items():
                assert torch.equal(unpacked[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), (i, name)
    stream.close()


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_each_step_streams_the_layers_outside_the_resident_ones(depth):
    """4 layers, 3 device slots: 3 - (depth + 1) layers stay resident and the others take turns in a
    window of depth + 1 slots, so a step brings in 4 - 3 + depth + 1 layers: 2 with one rotating
    slot (Belady's minimum), 3 with the default double buffer; LRU would bring in all 4."""
    model = _model("apt-dense-tiny", "bf16")
    resident, layer = _sizes(model)
    stream = stream_weights(model, resident + 3 * layer, prefetch_depth=depth)
    passes = 10  # the prompt's and 9 decode steps

    def blocks_in():
        return moved_in(stream.stats()["store"])

    built = blocks_in()  # the first 3 layers come up from their host copies at construction
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=passes, greedy=True))
    # The first pass finds the first streamed layer already there (placed at construction).
    assert blocks_in() - built == (LAYERS - 3 + depth + 1) * passes - 1
    assert stream.stats()["resident_layers"] == 3 - (depth + 1) and stream.stats()["window"] == depth + 1
    stream.close()


def test_budget_errors_name_the_argument():
    model = _model("apt-dense-tiny", "bf16")
    with pytest.raises(ValueError, match="gpu_memory=1 .* is too small: the weights outside the layers take"):
        stream_weights(copy.deepcopy(model), 1)
    resident, layer = _sizes(model)
    with pytest.raises(ValueError, match="holds 0 of the 4 layers .*: give disk_path for the other 4"):
        stream_weights(copy.deepcopy(model), resident + layer, host_memory=1)
    with pytest.raises(ValueError, match="prefetch_depth must be an int >= 0, got -1"):
        stream_weights(copy.deepcopy(model), "50%", prefetch_depth=-1)
    with pytest.raises(ValueError, match="gpu_memory must be bytes .* got '12 parsecs'"):
        stream_weights(copy.deepcopy(model), "12 parsecs")
    assert parse_memory("1.5GiB", 0) == 3 * 2**29
    assert parse_memory("800MB", 0) == 800_000_000
    assert parse_memory("25%", 1000) == 250
    assert parse_memory(4096, 0) == 4096


def test_generate_with_gpu_memory_prints_what_it_prints_without(tmp_path):
    from test_cli_models import DATA, _run

    run = tmp_path / "run"
    code, _, stderr = _run("train", "--data", DATA, "--model", "apt-dense-tiny", "--seq-len", "32", "--batch-size", "4",
                           "--vocab-size", "300", "--precision", "fp32", "--steps", "3", "--out", str(run))
    assert code == 0, stderr
    prompt = ["generate", "--checkpoint", str(run), "--prompt", "The river", "--greedy", "--max-new-tokens", "8"]
    code, expected, _ = _run(*prompt)
    assert code == 0
    assert _run(*prompt, "--gpu-memory", "70%") == (0, expected, "")  # one of the two layers on the device
    code, _, stderr = _run(*prompt, "--gpu-memory", "1KB")
    assert code == 2 and "gpu_memory='1KB' (1000 bytes) is too small" in stderr


def test_a_100_percent_budget_is_exactly_the_weight_bytes():
    # Layers of 64 bytes and a resident buffer sized so that the weight total is one where
    # float arithmetic (total / 100 * 100) came out one byte short: 100% then fitted 15 of 16 layers.
    def float_percent(total):
        return int(float(100) * (total / 100))

    extra = next(k for k in range(1, 10_000) if float_percent(k + 16 * 64) != k + 16 * 64)
    total = extra + 16 * 64
    assert parse_memory("100%", total) == total and parse_memory("100.0%", total) == total
    assert parse_memory("50%", 7) == 3 and parse_memory("0.5KiB", 0) == 512
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(16))  # 64 bytes each
    model.register_buffer("extra", torch.zeros(extra, dtype=torch.uint8))
    stream = stream_weights(model, "100%")
    assert stream.weight_bytes == total and stream.capacity == 16 and not stream.moves_weights
    stream.close()


@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny"])
def test_percent_budgets_give_the_same_tokens_and_no_device_to_host_copies(preset, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, dtype="bfloat16", n_layers=8)).eval()
    prompts, config = [[1, 2, 3, 4, 5], [7, 8]], GenerationConfig(max_new_tokens=6, greedy=True)
    graphs_enabled, capacities = [], []

    class RecordingStepGraph(apt_hal.graphs.StepGraph):
        def __init__(self, fn, *, enabled=True):
            super().__init__(fn, enabled=enabled)
            graphs_enabled.append(enabled)

    monkeypatch.setattr(apt_hal.graphs, "StepGraph", RecordingStepGraph)
    expected = generate(model, prompts, config)
    assert graphs_enabled == [True]
    for budget in ("25%", "50%", "100%"):
        streamed = copy.deepcopy(model)
        stream = stream_weights(streamed, budget)
        capacities.append(stream.capacity)
        generate(streamed, prompts, config)  # warm-up
        warm = stream.stats()
        assert generate(streamed, prompts, config) == expected, budget
        stats = stream.stats()
        # Decode graphs only where nothing moves (all 8 layers resident), as for the unbudgeted model.
        assert graphs_enabled[-1] == (budget == "100%") and stream.moves_weights == (budget != "100%")
        moved_out = {route: n - warm["store"]["moved"].get(route, 0) for route, n in stats["store"]["moved"].items()
                     if route.startswith("device->") and route != "device->parked"}
        assert not any(moved_out.values()), (budget, moved_out)  # no device-to-host copy after warm-up
        if budget != "100%":
            streamed_in = stats["bytes_streamed"] - warm["bytes_streamed"]
            dropped = sum(stats["store"]["dropped"].values()) - sum(warm["store"]["dropped"].values())
            assert streamed_in > 0 and dropped > 0
        stream.close()
    assert 1 <= capacities[0] < capacities[1] < capacities[2] == 8, capacities
