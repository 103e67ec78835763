"""Weight streaming (apt_hal.models.streaming): layers in a PagedTensor under a device budget give
bit-identical weights from every tier and exactly the greedy tokens of the model without a budget."""

import copy

import pytest
import torch

from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.streaming import is_streamed, parse_memory, stream_weights
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
        assert generate(streamed, prompts, config) == expected, (device_layers, host_layers)
        stats = stream.stats()
        assert stats["device_layers"] == device_layers
        assert stats["layer_runs"] == LAYERS * 10  # the prompt pass and 9 decode steps
        moved = stats["store"]["moved"]
        if device_layers == LAYERS:
            assert moved == {} and stats["hit_rate"] == 1.0
        else:
            assert sum(n for route, n in moved.items() if route.endswith("->device")) > 0
        if host_layers is not None:
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
    assert sorted(store.tier_of(block_id) for block_id in stream.ids) == ["device", "disk", "disk", "host"]
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


def test_eviction_by_distance_streams_fewer_layers_than_lru_would():
    model = _model("apt-dense-tiny", "bf16")
    resident, layer = _sizes(model)
    stream = stream_weights(model, resident + 3 * layer)
    steps = 10
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=steps, greedy=True))
    moved_in = sum(n for route, n in stream.stats()["store"]["moved"].items() if route.endswith("->device"))
    # Belady on a cyclic sweep: 2 of the 4 layers come in per step (one stays, one slot prefetches);
    # LRU would bring in all 4.
    assert moved_in <= 2 * steps + 1
    stream.close()


def test_budget_errors_name_the_argument():
    model = _model("apt-dense-tiny", "bf16")
    with pytest.raises(ValueError, match="gpu_memory=1 .* is too small: the weights outside the layers take"):
        stream_weights(copy.deepcopy(model), 1)
    resident, layer = _sizes(model)
    with pytest.raises(ValueError, match="give disk_path for the other 3"):
        stream_weights(copy.deepcopy(model), resident + layer, host_memory=1)
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
