"""The past/present (KV cache) graph of apt-compile: prefill and decode in one graph, attention masks
with padding anywhere, generation on ONNX Runtime equal to apt_hal's, dtypes, and the files other
runners read (onnxruntime-genai runs the folder)."""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest
import torch

from apt_hal.cli import main as apt_hal_main
from apt_hal.compile import api, past, runner_configs, validate
from apt_hal.compile.ort_generate import OrtCausalLM
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate

QUIET = dict(log=lambda *a: None)
# Weights large enough that greedy decoding of a random model does not settle on one token.
INIT_STD = 0.2
# float32 results of differently shaped computations (a padded batch, one token at a time): a wrong
# mask or position is off by far more.
CLOSE = dict(rtol=1e-4, atol=1e-4)


def _model(preset, **overrides):
    """A preset with random weights; ``+MXFP4Linear``: every Linear layer but lm_head through fp4_matmul."""
    from apt_hal.nn import convert_model_to_mxfp4

    torch.manual_seed(0)
    name, _, variant = preset.partition("+")
    if variant:
        overrides["tie_embeddings"] = False
    model = build_model(ModelConfig.preset(name, init_std=INIT_STD, **overrides)).eval()
    return convert_model_to_mxfp4(model) if variant == "MXFP4Linear" else model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(preset, target="onnx") -> (model, folder, CompileResult)``, each exported once."""
    cache = {}

    def get(preset, target="onnx"):
        if (preset, target) not in cache:
            model = _model(preset)
            folder = tmp_path_factory.mktemp(f"{preset}-{target}")
            cache[preset, target] = model, folder, api.compile_model(model, folder, target=target, **QUIET)
        return cache[preset, target]

    return get


def _prompts(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


PRESETS = ["apt-dense-tiny", "apt-moe-tiny", pytest.param("apt-oss-tiny", marks=pytest.mark.slow)]
MXFP4_LINEAR = pytest.param("apt-dense-tiny+MXFP4Linear", marks=pytest.mark.slow)


# ---------------------------------------------------------------------------------------------
# Eager: the PastKV path computes what the full forward computes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny", "apt-oss-tiny"])
def test_prefill_then_decode_over_the_past_equals_one_full_forward(preset):
    model = _model(preset)
    wrapper, cfg = past.CausalLMWithPast(model), model.config
    ids = torch.tensor(_prompts(1, [30, 30]))  # past the oss window (16): sliding layers drop old keys
    mask = torch.ones(2, 30, dtype=torch.int64)
    with torch.no_grad():
        full = model(ids).logits
        logits, *cache = wrapper(ids[:, :20], mask[:, :20], past.positions_from_mask(mask[:, :20], 20),
                                 past.empty_past(cfg, 2, torch.float32))
        pieces = [logits]
        for t in range(20, 30):  # one token at a time, each step's presents as the next past
            logits, *cache = wrapper(ids[:, t:t + 1], mask[:, :t + 1], past.positions_from_mask(mask[:, :t + 1], 1),
                                     tuple(cache))
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **CLOSE)
    assert cache[0].shape == (2, cfg.n_kv_heads, 30, cfg.head_dim)


# ---------------------------------------------------------------------------------------------
# The exported graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS + [MXFP4_LINEAR])
def test_past_graph_has_optimums_interface_and_validates_on_unseen_shapes(exported, preset):
    model, folder, result = exported(preset)
    assert result.exit_code == api.EXIT_OK, result.verdict
    (v,) = result.validations
    assert v.passed, v.table()
    labels = {r.inputs.split(" [")[0] for r in v.rows}
    assert labels == {"export shape", "unseen prefill, left padded", "unseen decode", "unseen, size 1"}
    assert {r.output for r in v.rows} == set(past.output_names(model.config.n_layers))
    graph = onnx.load(folder / api.MODEL_FILE)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in [*graph.graph.input, *graph.graph.output]}
    cfg = model.config
    assert dims["input_ids"] == dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
    assert set(dims["attention_mask"][1].split(" + ")) == set(dims["present.0.key"][2].split(" + ")) == {
        "past_sequence_length", "sequence_length"}
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "apt_model.json", "config.json", "genai_config.json",
                                                 "compile_report.json"}


def _logits_of_rows(run, prompts, side):
    """Prefill logits of ``prompts`` padded on ``side`` in one batch, then of one more token each."""
    width = max(map(len, prompts))
    pads = [[0] * (width - len(p)) for p in prompts]
    rows = [(pad + p) if side == "left" else (p + pad) for p, pad in zip(prompts, pads)]
    masks = [([0] * len(pad) + [1] * len(p)) if side == "left" else ([1] * len(p) + [0] * len(pad))
             for p, pad in zip(prompts, pads)]
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    logits, *cache = run(ids, mask, past.positions_from_mask(mask, width), past.empty_past(run.config, len(prompts),
                                                                                           torch.float32))
    mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.int64)], 1)
    step, *_ = run(torch.full((len(prompts), 1), 7), mask, past.positions_from_mask(mask, 1), tuple(cache))
    return logits, step[:, 0], mask[:, :-1].bool()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("runtime", ["eager", "onnxruntime", "onnxruntime, tensorrt target"])
def test_left_and_right_padding_give_every_row_the_logits_it_gets_alone(exported, preset, runtime):
    # The tensorrt target's graph feeds Attention an additive float mask where the onnx target's
    # feeds the BOOL one: padded rows must still get what they get alone.
    model, folder, _ = exported(preset, "tensorrt" if "tensorrt" in runtime else "onnx")
    if runtime == "eager":
        wrapper = past.CausalLMWithPast(model)

        def run(*args):
            with torch.no_grad():
                return wrapper(*args)
    else:
        graph = validate.graph_runner(folder / api.MODEL_FILE)

        def run(ids, mask, positions, cache):
            return graph([ids, mask, positions, *cache])
    run.config = model.config
    prompts = _prompts(2, [9, 3, 6])
    for side in ("left", "right"):
        logits, step, real = _logits_of_rows(run, prompts, side)
        for row, prompt in enumerate(prompts):
            alone_logits, alone_step, _ = _logits_of_rows(run, [prompt], side)
            torch.testing.assert_close(logits[row][real[row]], alone_logits[0], **CLOSE)
            torch.testing.assert_close(step[row], alone_step[0], **CLOSE)


@pytest.mark.parametrize("preset", PRESETS + [MXFP4_LINEAR])
def test_greedy_tokens_on_onnxruntime_equal_apt_hal_generate(exported, preset):
    model, folder, _ = exported(preset)
    prompts = _prompts(3, [5, 12, 1])  # never seen by the export
    config = GenerationConfig(max_new_tokens=64, greedy=True)
    ours = OrtCausalLM(folder).generate(prompts, config)
    assert ours == generate(model, prompts, config)
    assert all(len(set(tokens)) > 4 for tokens in ours)  # a real continuation, not one token repeated


def test_sampling_options_choose_as_apt_hal_generate(exported):
    model, folder, _ = exported("apt-dense-tiny")
    prompts = _prompts(4, [4, 7])
    config = GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3,
                              seed=11, stop_tokens=(5,))
    assert OrtCausalLM(folder).generate(prompts, config) == generate(model, prompts, config)


def test_onnxruntime_genai_generates_from_the_folder(exported):
    og = pytest.importorskip("onnxruntime_genai", reason="the genai extra (onnxruntime-genai) is not installed")
    import numpy as np

    model, folder, _ = exported("apt-dense-tiny")
    (prompt,) = _prompts(5, [6])
    genai_model = og.Model(str(folder))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    eos = json.loads((folder / runner_configs.GENAI_CONFIG_FILE).read_text())["model"]["eos_token_id"]
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=24, greedy=True, stop_tokens=(eos,)))[0]
    assert theirs[:len(ours)] == ours and len(ours) > 0


def test_config_json_of_a_model_without_tokenizer_names_no_token_ids(exported):
    from transformers import AutoConfig

    _, folder, _ = exported("apt-dense-tiny")
    hf = AutoConfig.from_pretrained(folder)
    assert hf.model_type == "llama" and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, None, None)


OPTIMUM_PYTHON = os.environ.get("APT_HAL_OPTIMUM_PYTHON")
OPTIMUM_CHECK = Path(__file__).with_name("optimum_check.py")
# optimum-onnx 0.1.0 reads a Mixtral's KV heads as num_attention_heads (num_key_value_heads only for
# the model types it lists), so a Mixtral loads there only without grouped-query attention.
MOE_ALL_KV_HEADS = "apt-moe-tiny, n_kv_heads = n_heads"


def _tiny_hf_checkpoint(kind, folder):
    """A tiny Llama or Mixtral made with transformers, saved in ``folder / "hf"`` and apt-compiled
    into ``folder / "onnx"``; returns that export's folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else
          MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)))
    hf.save_pretrained(folder / "hf")
    result = api.compile_model(str(folder / "hf"), folder / "onnx", **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    return folder / "onnx"


@pytest.mark.skipif(not OPTIMUM_PYTHON, reason="APT_HAL_OPTIMUM_PYTHON is not set: it names the python of a "
                    "virtual environment with optimum-onnx[onnxruntime] (docs/optimum-ci.txt makes one)")
@pytest.mark.parametrize("source", ["tiny Llama checkpoint", "apt-dense-tiny",
                                    pytest.param("apt-oss-tiny", marks=pytest.mark.slow),
                                    pytest.param(MOE_ALL_KV_HEADS, marks=pytest.mark.slow)])
def test_optimum_ortmodel_generates_the_same_tokens(exported, tmp_path, source):
    if source == "tiny Llama checkpoint":
        from apt_hal.models.hf import load_pretrained

        folder = _tiny_hf_checkpoint("llama", tmp_path)
        model = load_pretrained(tmp_path / "hf")
    elif source == MOE_ALL_KV_HEADS:
        model, folder = _model("apt-moe-tiny", n_kv_heads=ModelConfig.preset("apt-moe-tiny").n_heads), tmp_path / "onnx"
        assert api.compile_model(model, folder, **QUIET).exit_code == api.EXIT_OK
    else:
        model, folder, _ = exported(source)
    prompts = _prompts(7, [6, 11, 1], vocab=model.config.vocab_size)  # one left-padded batch on optimum's side
    expected = generate(model, prompts, GenerationConfig(max_new_tokens=32, greedy=True))
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"folder": str(folder), "prompts": prompts, "max_new_tokens": 32,
                                "expected": expected}))
    run = subprocess.run([OPTIMUM_PYTHON, str(OPTIMUM_CHECK), str(case)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{OPTIMUM_CHECK.name} exited {run.returncode}:\n{run.stdout}\n{run.stderr[-3000:]}"
    assert json.loads(run.stdout.splitlines()[-1])["optimum"] == expected


# ---------------------------------------------------------------------------------------------
# Dtypes, checkpoints, the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_bfloat16_model_exports_to_a_graph_onnxruntime_runs(tmp_path, dtype):
    model = _model("apt-dense-tiny", n_layers=1).to(torch.bfloat16)
    result = api.compile_model(model, tmp_path, dtype=dtype, **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict + "\n" + result.validations[0].table()
    graph = onnx.load(tmp_path / api.MODEL_FILE)
    expected = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}[dtype]
    assert {i.type.tensor_type.elem_type for i in graph.graph.output} == {expected}
    assert json.loads((tmp_path / "apt_model.json").read_text())["dtype"] == dtype


def test_a_bad_dtype_is_a_usage_error(tmp_path):
    # A seq2seq model with a KV cache is no longer one: tests/test_compile_seq2seq_past.py.
    result = api.compile_model("apt-dense-tiny", tmp_path, dtype="int8", **QUIET)
    assert result.exit_code == api.EXIT_USAGE and "--dtype" in result.verdict


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_tiny_hugging_face_checkpoints_generate_the_same_tokens_on_onnxruntime(tmp_path, kind):
    from apt_hal.models.hf import load_pretrained

    folder = _tiny_hf_checkpoint(kind, tmp_path)
    prompts = _prompts(6, [7, 3], vocab=128)
    config = GenerationConfig(max_new_tokens=64, greedy=True)
    assert OrtCausalLM(folder).generate(prompts, config) == generate(load_pretrained(tmp_path / "hf"), prompts, config)
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind


def test_apt_hal_generate_with_onnx_runs_the_exported_folder(exported, tmp_path):
    from onnx_generate_cli import generate_on_the_command_line

    _, folder, _ = exported("apt-dense-tiny")
    printed, expected = generate_on_the_command_line(folder, OrtCausalLM)
    assert printed == expected
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert apt_hal_main(["generate", "--onnx", str(tmp_path), "--prompt", "x"]) == 2
    assert "apt_model.json" in err.getvalue()


def test_apt_compile_passes_dtype_and_no_kv_cache_through(monkeypatch, tmp_path, capsys):
    from apt_hal.compile import cli

    seen = {}

    def fake_compile(model, output, **kwargs):
        seen.update(kwargs)
        return api.CompileResult(api.EXIT_OK, "not run")

    monkeypatch.setattr(api, "compile_model", fake_compile)
    base = ["--target", "onnx", "--model", "apt-dense-tiny", "--output", str(tmp_path)]
    assert cli.main(base) == api.EXIT_OK and (seen["kv_cache"], seen["dtype"]) == (None, None)
    assert cli.main(base + ["--no-kv-cache", "--dtype", "float16"]) == api.EXIT_OK
    assert (seen["kv_cache"], seen["dtype"]) == (False, "float16")
