"""The encoder + decoder-with-past export of seq2seq models (optimum's classic layout): the eager
wrappers compose to the full forward, each graph validates on unseen shapes, generation on ONNX
Runtime equals apt_hal's, and the command lines."""

import json

import onnx
import pytest
import torch

from apt_hal.compile import api, ort_generate, seq2seq_past
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.seq2seq import EncoderOutput
from tests.test_compile_tensorrt import attention_mask_types

QUIET = dict(log=lambda *a: None)
# Weights large enough that greedy decoding of a random model does not settle on one token.
INIT_STD = 0.3
CLOSE = dict(rtol=1e-4, atol=1e-4)  # float32 results of differently shaped computations
MOE_MXFP4 = dict(n_experts=4, top_k=2, mxfp4_experts=True)  # experts through moe_dispatch, MXFP4 weights
VARIANTS = {"tiny": {}, "moe-mxfp4": MOE_MXFP4}


def _model(variant="tiny", **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("apt-seq2seq-tiny", init_std=INIT_STD, **VARIANTS[variant],
                                          **overrides)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(variant) -> (model, folder, CompileResult)``, each variant exported once."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model, folder = _model(variant), tmp_path_factory.mktemp(variant)
            cache[variant] = model, folder, api.compile_model(model, folder, kv_cache=True, **QUIET)
        return cache[variant]

    return get


def _prompts(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


EXPORTED = ["tiny", pytest.param("moe-mxfp4", marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_then_decoder_steps_over_the_cache_equal_one_full_forward(variant):
    model = _model(variant)
    n = model.config.n_layers
    encoder, decoder = seq2seq_past.Seq2SeqEncoder(model), seq2seq_past.Seq2SeqDecoder(model)
    with_past = seq2seq_past.Seq2SeqDecoderWithPast(model)
    ids, decoder_ids = torch.tensor(_prompts(1, [9, 9])), torch.tensor(_prompts(2, [8, 8]))
    mask = seq2seq_past.padded_mask(2, 9, padded_rows=2)  # row 0 padded on the left, row 1 on the right
    with torch.no_grad():
        full = model(ids, decoder_input_ids=decoder_ids, attention_mask=mask).logits
        logits, *cache = decoder(decoder_ids[:, :3], mask, encoder(ids, mask))
        pieces = [logits]
        for t in range(3, 8):  # one token at a time; the encoder's keys and values passed back unchanged
            logits, *presents = with_past(decoder_ids[:, t:t + 1], mask, tuple(cache))
            for i in range(n):
                cache[4 * i:4 * i + 2] = presents[2 * i:2 * i + 2]
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **CLOSE)
    cfg = model.config
    assert cache[0].shape == (2, cfg.n_kv_heads, 8, cfg.head_dim) and cache[2].shape == (2, cfg.n_kv_heads, 9,
                                                                                           cfg.head_dim)


def test_a_decoder_step_with_neither_the_encoder_output_nor_its_cached_keys_is_refused():
    model = _model()
    n, cfg = model.config.n_layers, model.config
    past = tuple(torch.zeros(1, cfg.n_kv_heads, 2, cfg.head_dim) for _ in range(4 * n))
    step = seq2seq_past.Seq2SeqDecoderWithPast(model)
    with pytest.raises(ValueError, match="past_key_values must hold 4 tensors"):
        step(torch.tensor([[5]]), torch.ones(1, 2, dtype=torch.int64), past[:-1])
    memory = EncoderOutput(None, torch.ones(1, 2, dtype=torch.bool), [])
    with pytest.raises(ValueError, match="cross-attention of decoder layer 0"):
        model(decoder_input_ids=torch.tensor([[5]]), encoder_output=memory)


def _dims(path):
    graph = onnx.load(path, load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


@pytest.mark.parametrize("variant", EXPORTED)
def test_seq2seq_exports_optimums_three_graphs_each_validated_on_unseen_shapes(exported, variant):
    model, folder, result = exported(variant)
    cfg = model.config
    assert result.exit_code == api.EXIT_OK, result.verdict
    assert [v.runtime for v in result.validations] == [f"onnxruntime, {g}" for g in seq2seq_past.GRAPHS]
    for graph, v in zip(seq2seq_past.GRAPHS, result.validations):
        assert v.passed, v.table()
        assert {r.inputs.split(" [")[0] for r in v.rows} == {"export shape", "unseen, padded encoder",
                                                             "unseen, size 1"}
        inputs, outputs = seq2seq_past.names(cfg.n_layers, graph)
        assert {r.output for r in v.rows} == set(outputs)
        assert list(_dims(folder / graph))[:len(inputs)] == inputs
    encoder = _dims(folder / seq2seq_past.ENCODER_FILE)
    assert encoder["input_ids"] == encoder["attention_mask"] == ["batch_size", "encoder_sequence_length"]
    assert encoder["last_hidden_state"] == ["batch_size", "encoder_sequence_length", cfg.d_model]
    decoder = _dims(folder / seq2seq_past.DECODER_FILE)
    assert decoder["present.1.decoder.value"] == ["batch_size", cfg.n_kv_heads, "decoder_sequence_length",
                                                  cfg.head_dim]
    assert decoder["present.1.encoder.key"] == ["batch_size", cfg.n_kv_heads, "encoder_sequence_length", cfg.head_dim]
    with_past = _dims(folder / seq2seq_past.DECODER_WITH_PAST_FILE)
    assert with_past["past_key_values.0.decoder.key"] == ["batch_size", cfg.n_kv_heads, "past_decoder_sequence_length",
                                                          cfg.head_dim]
    assert with_past["past_key_values.0.encoder.value"][2] == "encoder_sequence_length"
    assert set(with_past["present.0.decoder.key"][2].split(" + ")) == {"past_decoder_sequence_length",
                                                                       "decoder_sequence_length"}
    report = json.loads((folder / "compile_report.json").read_text())
    assert list(report["graphs"]) == list(seq2seq_past.GRAPHS) and all(v["passed"] for v in report["validations"])
    assert {"apt_model.json", *seq2seq_past.GRAPHS} <= set(report["files"])
    if variant == "moe-mxfp4":  # experts through moe_dispatch, their packed MXFP4 codes decoded in the graph
        assert {"moe_route", "moe_experts"} <= set(report["graphs"][seq2seq_past.DECODER_FILE]["apt_hal_ops"])
        assert any(i.data_type == onnx.TensorProto.UINT8
                   for i in onnx.load(folder / seq2seq_past.ENCODER_FILE).graph.initializer)


@pytest.mark.parametrize("variant", EXPORTED)
def test_greedy_tokens_on_onnxruntime_equal_apt_hal_generate(exported, variant):
    model, folder, _ = exported(variant)
    prompts = _prompts(3, [5, 12, 1])  # never seen by the export; one batch, so padded
    config = GenerationConfig(max_new_tokens=64, greedy=True)
    runner = ort_generate.load(folder)
    assert isinstance(runner, ort_generate.OrtSeq2SeqLM)
    ours = runner.generate(prompts, config)
    assert ours == generate(model, prompts, config)
    assert all(len(tokens) == 64 and len(set(tokens)) > 4 for tokens in ours)  # not one token repeated


def test_sampling_options_choose_as_apt_hal_generate(exported):
    model, folder, _ = exported("tiny")
    prompts = _prompts(4, [4, 7])
    config = GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3,
                              seed=11, stop_tokens=(5,))
    assert ort_generate.load(folder).generate(prompts, config) == generate(model, prompts, config)


def test_apt_hal_generate_with_onnx_runs_a_seq2seq_folder(exported):
    from onnx_generate_cli import generate_on_the_command_line

    _, folder, _ = exported("tiny")
    printed, expected = generate_on_the_command_line(folder, ort_generate.OrtSeq2SeqLM)
    assert printed == expected


def test_a_folder_missing_a_seq2seq_graph_is_named(exported, tmp_path):
    _, folder, _ = exported("tiny")
    for name in ("apt_model.json", seq2seq_past.ENCODER_FILE, seq2seq_past.DECODER_FILE):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=seq2seq_past.DECODER_WITH_PAST_FILE):
        ort_generate.load(tmp_path)


def test_no_kv_cache_still_gives_the_full_sequence_graph(tmp_path):
    model = _model(n_layers=1, n_encoder_layers=1)
    result = api.compile_model(model, tmp_path, kv_cache=False, dynamic_batch=True, dynamic_seq=True, **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    assert [g.exported.path.name for g in result.graphs] == [api.MODEL_FILE]
    assert result.exported.input_names == ["input_ids", "decoder_input_ids"]
    assert not (tmp_path / seq2seq_past.ENCODER_FILE).exists()


def test_tensorrt_target_writes_a_readiness_report_and_script_per_graph(tmp_path):
    model = _model(n_layers=1, n_encoder_layers=1)
    result = api.compile_model(model, tmp_path, target="tensorrt", **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    # The graphs as written (masks rewritten) validate on ONNX Runtime, padded encoder rows included.
    assert [v.runtime for v in result.validations] == [f"onnxruntime, {g}" for g in seq2seq_past.GRAPHS]
    for v in result.validations:
        assert v.passed and any(r.inputs.startswith("unseen, padded encoder") for r in v.rows), v.table()
    for graph in result.graphs:
        stem = graph.exported.path.stem
        assert graph.readiness is not None and graph.readiness_file == f"trt_readiness.{stem}.md"
        # Every masked Attention node takes a float additive mask (TensorRT's types), none a BOOL one.
        masks = attention_mask_types(onnx.load(graph.exported.path))
        assert onnx.TensorProto.FLOAT in masks and onnx.TensorProto.BOOL not in masks, masks
        assert graph.readiness.ready, graph.readiness.markdown()
        assert "NOT READY" not in (tmp_path / graph.readiness_file).read_text()
        script = (tmp_path / f"build_trt.{stem}.sh").read_text()
        assert f"trtexec --onnx={stem}.onnx --stronglyTyped" in script
        assert graph.tensorrt.startswith("TensorRT build: ")
    assert [g.exported.path.name for g in result.graphs] == list(seq2seq_past.GRAPHS)
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert all(report["graphs"][g]["readiness"] is not None for g in seq2seq_past.GRAPHS)
