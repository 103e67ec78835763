"""The issue-16 benchmark scripts run end to end on the CPU in their smoke modes and print every
column of their tables; the gpt-oss-shaped checkpoint they write loads in transformers with the
same logits. (The numbers are the GPU session's; here only the plumbing is checked.)"""

import dataclasses
import re
import sys

import pytest
import torch

from apt_hal.models import ModelConfig, build_model
from apt_hal.models.hf import config_to_hf, load_pretrained
from benchmarks import floor, gpt_oss_shape, harness, models, streaming
from benchmarks.ops import fp4_matmul


def table_rows(text: str) -> list[list[str]]:
    """The cells of each markdown table row printed in ``text`` (header first, rule skipped)."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows]


def test_weight_bytes_floor_counts_top_k_experts_and_skips_an_untied_embedding():
    cfg = ModelConfig.preset("apt-moe-tiny")
    model = build_model(cfg)
    tensors = dict(model.named_parameters())
    every = sum(t.numel() * t.element_size() for t in tensors.values())
    experts = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.endswith(("w_up", "w_down")))
    embed = tensors["embed.weight"].numel() * 4
    expected = every - embed - experts + experts * cfg.top_k // cfg.n_experts
    assert floor.weight_bytes_per_step(model) == expected


def test_weight_bytes_floor_counts_a_tied_embedding_once():
    model = build_model(ModelConfig.preset("apt-dense-tiny"))  # tie_embeddings: embed is the lm_head
    assert floor.weight_bytes_per_step(model) == sum(t.numel() * 4 for t in model.parameters())


def test_models_tiny_prints_eager_static_floor_and_target_columns(capsys):
    models.main(["--tiny", "--families", "dense", "--batch", "1", "--prompt-len", "8", "--decode-len", "2"])
    out = capsys.readouterr().out
    assert "transformers static cache: decode step compiled by torch.compile: no" in out
    head, *body = table_rows(out)
    for column in ("prefill tok/s HF eager", "prefill tok/s HF static NOT compiled",
                   "prefill x HF static NOT compiled", "decode tok/s HF static NOT compiled",
                   "decode x HF static NOT compiled", "floor tok/s", "% of floor",
                   "target: decode >= 65% floor and > HF static NOT compiled (batch 1)",
                   "target: prefill >= 1x HF static NOT compiled"):
        assert column in head
    assert [r[1] for r in body] == ["fp32", "mxfp4"]
    for row in body:
        cells = dict(zip(head, row))
        assert float(cells["decode tok/s HF static NOT compiled"]) > 0
        assert float(cells["floor tok/s"]) > 0 and cells["% of floor"].endswith("%")
        assert row[-1] in ("yes", "NO") and row[-3] in ("yes", "NO")


def test_static_baseline_keeps_the_decode_step_eager_only_when_asked():
    assert models.static_options(True) == {"cache_implementation": "static"}
    assert models.static_options(False) == {"cache_implementation": "static", "disable_compile": True}


def test_gpt_oss_shape_is_the_published_20b_config():
    # transformers' GptOssConfig defaults are the published gpt-oss-120b; 20b has 24 layers, 32 experts.
    from transformers import GptOssConfig
    published = GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    ours = config_to_hf(gpt_oss_shape.config(tiny=False))
    assert ours["quantization_config"]["quant_method"] == "mxfp4"
    differing = {k: (v, published[k]) for k, v in ours.items() if k in published and v != published[k]}
    assert differing.keys() <= {"architectures", "dtype"}, differing
    assert ours["num_local_experts"] == 32 and ours["num_hidden_layers"] == 24 and ours["sliding_window"] == 128


def test_gpt_oss_tiny_checkpoint_loads_in_transformers_with_our_logits(tmp_path):
    cfg = gpt_oss_shape.config(tiny=True)
    gpt_oss_shape.write_checkpoint(cfg, str(tmp_path), torch.device("cpu"))
    assert any(p.name == "model.safetensors" for p in tmp_path.iterdir())
    ours = load_pretrained(tmp_path).eval()
    assert ours.layers[0].ffn.w_up.dtype == torch.uint8  # the experts stay MXFP4
    theirs, held = gpt_oss_shape.load_transformers(str(tmp_path), torch.float32, torch.device("cpu"))
    assert held == "torch.float32 (dequantized)"
    verdict = gpt_oss_shape.check_logits(ours, theirs, cfg, torch.device("cpu"), strict=True)
    assert "top-1 agreement 100%" in verdict


def test_gpt_oss_logit_check_refuses_different_models(tmp_path):
    cfg = gpt_oss_shape.config(tiny=True)
    gpt_oss_shape.write_checkpoint(cfg, str(tmp_path), torch.device("cpu"))
    ours = load_pretrained(tmp_path).eval()
    theirs, _ = gpt_oss_shape.load_transformers(str(tmp_path), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        theirs.lm_head.weight.mul_(1.01)
    with pytest.raises(SystemExit, match="logits disagree"):
        gpt_oss_shape.check_logits(ours, theirs, cfg, torch.device("cpu"), strict=True)


def test_gpt_oss_drift_check_names_the_library_that_moved(monkeypatch):
    """The drift line compares each library's device-dtype logits with its own float32 ones: a
    transformers model whose device copy is perturbed shows up on transformers' side only."""
    load = gpt_oss_shape.load_transformers

    def perturbed_device_copy(folder, dtype, device):
        model, held = load(folder, dtype, device)
        if len(loads) == 1:  # the second load: the one in the model's dtype "on the device"
            with torch.no_grad():
                model.lm_head.weight.mul_(1.5)
        loads.append(dtype)
        return model, held

    loads = []
    monkeypatch.setattr(gpt_oss_shape, "load_transformers", perturbed_device_copy)
    line = gpt_oss_shape.drift_check(True, torch.device("cpu"))
    values = dict(re.findall(r"(apt_hal float32 vs transformers float32|apt_hal|transformers) ([0-9.e+-]+)", line))
    assert len(loads) == 2 and float(values["apt_hal float32 vs transformers float32"]) < 1e-5, line
    assert float(values["apt_hal"]) == 0 and float(values["transformers"]) > 0.1, line


def test_gpt_oss_shape_tiny_prints_its_table(capsys):
    gpt_oss_shape.main(["--tiny", "--batch", "1", "2"])
    out = capsys.readouterr().out
    assert "experts in memory: apt_hal MXFP4; transformers torch.float32 (dequantized)" in out
    assert "logit drift: one layer, [2, 32] ids" in out
    head, *body = table_rows(out)
    assert head == ["model", "batch", "prefill tok/s apt", "prefill tok/s HF", "decode tok/s apt", "decode tok/s HF",
                    "decode x HF"]
    assert [r[1] for r in body] == ["1", "2"]


def test_gemlite_column_says_not_installed_without_gemlite(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemlite", None)  # import gemlite.helper raises ImportError
    monkeypatch.setitem(sys.modules, "gemlite.helper", None)
    gen = torch.Generator().manual_seed(0)
    packed, scales = fp4_matmul.make_weights(32, 64, gen)
    assert fp4_matmul.gemlite_layer(packed, scales) == "not installed"


def test_harness_table_prints_a_baseline_without_a_time_as_its_reason(capsys):
    row = harness.Row("fp4_matmul", "M=1", 10.0, {"bf16 cuBLAS": 30.0, fp4_matmul.GEMLITE: "not installed"})
    head, cells = table_rows(harness.print_table([row]))
    cells = dict(zip(head, cells))
    assert cells["gemlite A16W4_MXFP us"] == "not installed" and cells["vs gemlite A16W4_MXFP"] == ""
    assert cells["vs bf16 cuBLAS"] == "3.00x"


def test_fp4_matmul_tiny_prints_every_column(capsys):
    rows = fp4_matmul.run(harness.measure_host_ceilings(), tiny=True)
    head, *body = table_rows(harness.print_table(rows))
    assert head[3:6] == ["bf16 cuBLAS us", "dequant+linear us", "gemlite A16W4_MXFP us"]
    assert [r[1] for r in body] == ["M=1 K=256 N=256 bf16", "M=16 K=256 N=256 bf16"]
    assert all(dict(zip(head, r))["gemlite A16W4_MXFP us"] == "GPU only" for r in body)


def test_a_gemlite_failure_fills_its_column_and_leaves_the_run_going(monkeypatch, capsys):
    def broken(packed, scales):
        raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp4_matmul, "gemlite_layer", broken)
    gen = torch.Generator().manual_seed(0)

    def make():
        packed, scales = fp4_matmul.make_weights(32, 64, gen)
        return torch.randn(1, 64, dtype=torch.bfloat16), packed, scales
    assert fp4_matmul.time_gemlite(make, "M=1", 1024) == "failed (RuntimeError)"
    assert "gemlite M=1: FAILED RuntimeError: no kernel for this GPU" in capsys.readouterr().out


def test_fp4_matmul_decode_sweep_candidates_are_labelled_and_few():
    """--sweep decode times, per shape, the default first, the same with the fused reduction, and
    for M = 1 the CUDA-core GEMV tiles; labels tell the reductions apart; at most 60 schedules
    in all (each compiles anew: a few seconds each on the GPU host)."""
    total = 0
    for m, k, n in fp4_matmul.DECODE_SWEEP_SHAPES:
        configs = fp4_matmul.sweep_configs(m, k, n, decode_only=True)
        auto = fp4_matmul.kernels.choose_config(m, n, k)
        split = fp4_matmul.kernels.effective_split(auto, k)
        assert configs[0] == dataclasses.replace(auto, split_k=split, fused_reduce=auto.fused_reduce and split > 1)
        assert len(set(configs)) == len(configs)
        assert any(c.fused_reduce for c in configs) == (configs[0].split_k > 1 or m <= 16)
        assert any(c.cuda_core for c in configs) == (m <= 4)
        for c in configs:
            assert c.split_k == fp4_matmul.kernels.effective_split(c, k)
            label = fp4_matmul.describe(c)
            assert ("fused" in label) == c.fused_reduce and ("+sum-kernel" in label) == (c.split_k > 1 and
                                                                                        not c.fused_reduce)
            assert label.startswith("gemv" if c.cuda_core else "mma")
        total += len(configs)
    assert total <= 60


@pytest.mark.parametrize("tile", fp4_matmul.GEMV_TILES)
def test_fp4_matmul_sweep_gemv_tiles_run(tile):
    """Each GEMV tile of the sweep launches and matches the reference (interpreter, one K step of
    a small problem, split in two)."""
    bn, bk, warps, stages = tile
    gen = torch.Generator().manual_seed(bn + bk)
    packed, scales = fp4_matmul.make_weights(bn + 3, 2 * bk, gen)
    x = torch.randn(1, 2 * bk, generator=gen, dtype=torch.bfloat16)
    cfg = fp4_matmul._gemv(1, bn, bk, warps, stages, 2)
    fp4_matmul.check("gemv tile", fp4_matmul.kernels.matmul(x, packed, scales, config=cfg), x, packed, scales)


def test_streaming_tiny_runs_one_model_and_copies_nothing_back_from_the_device(capsys):
    streaming.main(["--tiny", "--models", "apt-dense-tiny", "--steps", "2", "--prefetch-depth", "0", "1"])
    out = capsys.readouterr().out
    assert "apt-moe-tiny" not in out  # --models picked one model
    header = next(line for line in out.splitlines() if line.startswith("model"))
    assert header.split()[-2:] == ["MB/step", "dropped/step"] and "d2h" in header and "depth" in header
    rows = [line.split() for line in out.splitlines() if line.startswith("apt-dense-tiny") and "skipped" not in line]
    # (budget, depth, device layers, batch): a row per --prefetch-depth where layers stream; at 25% the
    # tiny model keeps 1 layer, so depth 1 has one slot to rotate, as depth 0 (the depth column says 0)
    assert [(r[1], r[2], r[4]) for r in rows] == [
        *((b, "-", batch) for b in ("none", "100%") for batch in ("1", "16")),
        *(("50%", depth, batch) for depth in ("0", "1") for batch in ("1", "16")),
        *(("25%", "0", batch) for _ in ("0", "1") for batch in ("1", "16"))]
    depth_0, depth_1 = (float(r[6]) for r in rows if r[1] == "50%" and r[4] == "1")  # MB/step
    assert depth_1 > depth_0  # the second slot streams one layer more per step
    for row in rows:
        assert float(row[-2]) == 0.0, row  # d2h MB/step: layers go back to their kept copies
        assert (float(row[-1]) > 0) == (row[1] not in ("none", "100%")), row  # dropped/step: only while layers stream
    with pytest.raises(SystemExit, match="--models must be a comma list of apt-dense-tiny, apt-moe-tiny, got 'x'"):
        streaming.main(["--tiny", "--models", "x"])
    with pytest.raises(SystemExit):  # an argument error (exit 2), not a budget row reported as skipped
        streaming.main(["--tiny", "--prefetch-depth", "-1"])
    assert "--prefetch-depth: must be an int >= 0, got '-1'" in capsys.readouterr().err
