"""apt-compile --target tensorrt: the strongly typed graph, FP4 as DequantizeLinear (FLOAT4E2M1 elements,
FLOAT8E8M0 block-32 scales) validated under onnx.reference, the readiness report against TensorRT's
operator list, the build script, and an honest TensorRT line (an engine only where one was built)."""

import json
import subprocess

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from apt_hal import mxfp4, ops
from apt_hal.compile import api, cli, lowering, tensorrt, validate
from apt_hal.compile.export import export_onnx
from apt_hal.compile.validate import InputSet
from apt_hal.models import ModelConfig

QUIET = dict(log=lambda *a: None)
TRT_AVAILABLE, TRT_WHY = tensorrt.availability()


class Fp4Linear(torch.nn.Module):
    def __init__(self, n=40, k=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g)
        w[3, :32] = float("nan")  # a NaN scale (0xFF)
        w[4, 32:] *= 1e-38  # tiny scales: 2^-127 is a float32 subnormal, still exact
        packed, scales = mxfp4.quantize(w)
        self.register_buffer("w_packed", packed)
        self.register_buffer("w_scales", scales)

    def forward(self, x):
        return ops.fp4_matmul(x, self.w_packed, self.w_scales)


def _x(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_qdq_graph_validates_under_onnx_reference(tmp_path, dtype):
    m = Fp4Linear()
    sets = [InputSet("seen", (_x((2, 3), 0, dtype),)), InputSet("unseen", (_x((5, 1), 1, dtype),))]
    e = export_onnx(m, sets[0].args, tmp_path / "fp4.onnx", target="tensorrt", fp4="qdq",
                    dynamic={"x": {0: "b", 1: "m"}}, output_names=["y"], **QUIET)
    assert e.target.opset == 24 and e.model.ir_version == 12
    (dq,) = [n for n in e.model.graph.node if n.op_type == "DequantizeLinear"]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs["block_size"] == 32 and attrs["axis"] == 1 and attrs["output_dtype"] == TensorProto.FLOAT
    inits = {i.name: i for i in e.model.graph.initializer}
    packed, scales = inits[dq.input[0]], inits[dq.input[1]]
    assert (packed.data_type, list(packed.dims)) == (TensorProto.FLOAT4E2M1, [40, 64])
    assert (scales.data_type, list(scales.dims)) == (TensorProto.FLOAT8E8M0, [40, 2])
    assert packed.raw_data == m.w_packed.numpy().tobytes()  # the same bytes: no re-quantization
    v = validate.validate(e.path, m, sets, e.output_names, op="fp4_matmul", runtime="onnx.reference", reduction=64)
    assert v.passed, v.table()
    assert torch.isnan(m(sets[1].args[0])[..., 3]).all()  # the NaN block was really compared
    # TensorRT documents FP4 only as NVFP4 (FP8 scales, block 16): MXFP4's layout is reported, not passed.
    dq_check = {o.op_type: o for o in tensorrt.readiness(e.model).ops}["DequantizeLinear"]
    assert dq_check.status == "unsupported" and any("MXFP4" in n and "NVFP4" in n for n in dq_check.notes)


def _graph(nodes, inputs, outputs, initializers=(), opset=24):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=12)
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_readiness_reports_unsupported_operators_types_and_restrictions():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    model = _graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"]),                    # restriction checkable: ok
         helper.make_node("CumSum", ["i", "axis"], ["c"]),                    # INT64: not a TensorRT type
         helper.make_node("BitShift", ["u", "u"], ["s"], direction="LEFT"),   # listed, unsupported
         helper.make_node("Softmax", ["v"], ["p"])],
        [_vi("x", TensorProto.FLOAT, [3, 5]), _vi("u", TensorProto.UINT8, [4])],
        [_vi("p", TensorProto.FLOAT, [3, 2]), _vi("c", TensorProto.INT64, [3, 2]), _vi("s", TensorProto.UINT8, [4])],
        [k, axis])
    r = tensorrt.readiness(model)
    status = {o.op_type: o for o in r.ops}
    assert status["TopK"].status == "ok" and "restriction verified" in status["TopK"].notes[0]
    assert status["Softmax"].status == "ok" and status["Softmax"].types == ["FP32"]
    assert status["CumSum"].status == "unsupported" and "INT64" in status["CumSum"].notes[0]
    assert status["BitShift"].status == "unsupported"
    assert not r.ready and r.verdict == "NOT READY"
    md = r.markdown()
    assert "NOT READY" in md and "| CumSum | 1 | unsupported |" in md and r.source in md

    big_k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])  # past TensorRT's K < 3840
    model = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [_vi("x", TensorProto.FLOAT, [3, 5000])],
                   [_vi("v", TensorProto.FLOAT, [3, 4000])], [big_k], opset=25)
    r = tensorrt.readiness(model)
    assert r.ops[0].status == "check" and not r.ready  # opset 25 is past TensorRT 10.15's 24
    assert "OUTSIDE" in r.markdown()


def test_readiness_reads_a_graph_whose_weights_are_in_an_external_data_file(tmp_path, monkeypatch):
    """Past 2 GiB the export saves its weights next to the graph; readiness reads types and shapes
    from the graph and never the data file, wherever the process runs."""
    weight = onnx.numpy_helper.from_array(torch.full((64, 64), 0.5).numpy(), "w")  # raw data: movable out
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("TopK", ["y", "k"], ["v", "i"])],
                   [_vi("x", TensorProto.FLOAT, [3, 64])], [_vi("v", TensorProto.FLOAT, [3, 2])], [weight, k])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)  # as export does, leaving the graph external
    monkeypatch.chdir(tmp_path.parent)
    for graph in (model, onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)):
        assert onnx.external_data_helper.uses_external_data(graph.graph.initializer[0])
        status = {o.op_type: o for o in tensorrt.readiness(graph).ops}
        assert status["MatMul"].status == "ok" and status["MatMul"].types == ["FP32"]
        assert status["TopK"].status == "ok", "the small inline k is still read"


def test_operator_list_names_its_source_and_covers_the_ops_we_emit():
    data = tensorrt.load_support()
    assert "onnx-tensorrt" in data["source"] and data["tensorrt_version"] == "10.15"
    assert (data["opset_min"], data["opset_max"]) == (9, 24)
    table = data["operators"]
    assert "FP4" in table["DequantizeLinear"]["types"] and table["RotaryEmbedding"]["supported"]
    assert table["CumSum"]["types"] == ["FP32", "FP16", "BF16"]
    for entry in table.values():
        assert set(entry) == {"supported", "types", "restrictions"}
        assert entry["supported"] or not entry["types"]


def test_moe_exports_for_tensorrt_with_float_counters_exactly(tmp_path):
    class MoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("w_up", torch.randn(4, 64, 32, generator=g) * 0.2)
            self.register_buffer("w_down", torch.randn(4, 32, 32, generator=g) * 0.2)

        def forward(self, x, logits):
            out = ops.moe_dispatch(x, logits, self.w_up, self.w_down, top_k=2, capacity_factor=0.75)
            return out.output, out.topk_ids, out.tokens_per_expert

    def inputs(t, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(t, 32, generator=g), torch.randn(t, 4, generator=g)

    m = MoE()
    sets = [InputSet("seen", inputs(8, 0)), InputSet("unseen", inputs(21, 1))]
    e = export_onnx(m, sets[0].args, tmp_path / "moe.onnx", target="tensorrt", output_names=["y", "ids", "kept"],
                    dynamic={"x": {0: "tokens"}, "logits": {0: "tokens"}}, **QUIET)
    v = validate.validate(e.path, m, sets, e.output_names, op="moe_dispatch")  # no FP4: ONNX Runtime runs it
    assert v.passed, v.table()
    r = tensorrt.readiness(e.model)
    assert r.ready, r.markdown()
    assert {o.op_type: o.types for o in r.ops}["CumSum"] == ["FP32"]


def test_tensorrt_target_writes_graph_report_and_script(tmp_path):
    # apt-oss (MXFP4 experts, YaRN, sinks, sliding window) with one layer, to keep CI short: its
    # past/present graph, MXFP4 decoded in the graph (TensorRT documents no MXFP4 DequantizeLinear).
    ModelConfig.preset("apt-oss-tiny", n_layers=1, layer_types=("sliding",)).to_json(tmp_path / "oss.json")
    result = api.compile_model(str(tmp_path / "oss.json"), tmp_path, target="tensorrt", **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    names = {f.name for f in result.files}
    assert {"model.onnx", "trt_readiness.md", "build_trt.sh", "compile_report.json", "genai_config.json"} <= names
    model = onnx.load(tmp_path / "model.onnx")
    assert [i.name for i in model.graph.output] == ["logits", "present.0.key", "present.0.value"]
    assert any(i.data_type == TensorProto.UINT8 for i in model.graph.initializer)  # packed MXFP4, decoded in the graph
    assert [v.runtime for v in result.validations][:1] == ["onnxruntime, model.onnx"]
    assert all(v.passed for v in result.validations)
    assert result.readiness.ready, result.readiness.markdown()

    script = (tmp_path / "build_trt.sh").read_text()
    subprocess.run(["bash", "-n", str(tmp_path / "build_trt.sh")], check=True)  # it parses
    # An empty past (prefill) in the profile; the mask spans past + new tokens.
    assert "--minShapes=input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x16" in script
    assert "--maxShapes=input_ids:128x192,attention_mask:128x512,position_ids:128x192" in script
    assert "attention_mask:[1,1]" in script and "--stronglyTyped" in script
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["readiness"]["ready"] and report["opset"] == 24 and report["ir_version"] == 12

    if TRT_AVAILABLE:  # a real engine, compared with ONNX Runtime
        assert result.tensorrt.startswith("TensorRT build: OK") and (tmp_path / "model.engine").exists()
    else:  # never an engine claimed where none was built
        assert result.tensorrt == f"TensorRT build: SKIPPED ({TRT_WHY}; run build_trt.sh on a machine with TensorRT)"
        assert not list(tmp_path.glob("*.engine"))


def test_readiness_looks_inside_subgraphs():
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [],
                                    [_vi("u", TensorProto.FLOAT, [None])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                    [_vi("e", TensorProto.FLOAT, [None])])
    model = _graph([helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
                   [_vi("c", TensorProto.BOOL, []), _vi("x", TensorProto.FLOAT, [4])],
                   [_vi("y", TensorProto.FLOAT, [None])])
    r = tensorrt.readiness(model)
    assert {o.op_type: o.status for o in r.ops}["Unique"] == "unsupported" and not r.ready


def attention_mask_types(model: onnx.ModelProto) -> list:
    """The element type of every Attention node's ``attn_mask``, subgraphs included (None: no mask)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graphs = list(tensorrt._graphs(inferred.graph))
    types = {v.name: v.type.tensor_type.elem_type for g in graphs for v in [*g.input, *g.value_info, *g.output]}
    types.update({i.name: i.data_type for g in graphs for i in g.initializer})
    return [types.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
            for g in graphs for n in g.node if n.op_type == "Attention"]


def _masked_attention_graph(dtype):
    """Two Attention nodes sharing one BOOL mask, and a third in an If branch reading it from the
    outer scope; the mask is computed (its type undeclared: the rewrite infers it)."""
    branch = lambda name, node: helper.make_graph([node], name, [], [_vi(f"{name}_y", dtype, None)])  # noqa: E731
    nodes = [helper.make_node("Identity", ["mask"], ["m"]),
             helper.make_node("Attention", ["q", "k", "v", "m"], ["y1"]),
             helper.make_node("Attention", ["q", "k", "v", "m"], ["y2"], scale=0.5),
             helper.make_node("If", ["c"], ["y3"],
                              then_branch=branch("then", helper.make_node("Attention", ["q", "k", "v", "m"],
                                                                          ["then_y"], scale=2.0)),
                              else_branch=branch("else", helper.make_node("Identity", ["y1"], ["else_y"])))]
    return _graph(nodes, [_vi("q", dtype, [1, 2, 3, 4]), _vi("k", dtype, [1, 2, 5, 4]), _vi("v", dtype, [1, 2, 5, 4]),
                          _vi("mask", TensorProto.BOOL, [1, 1, 3, 5]), _vi("c", TensorProto.BOOL, [])],
                  [_vi(name, dtype, [1, 2, 3, 4]) for name in ("y1", "y2", "y3")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_attention_masks_become_additive_masks_that_onnxruntime_computes_identically(dtype):
    """The tensorrt target's mask rewrite: no BOOL attn_mask left (a subgraph's included), one Where
    per mask however many nodes share it, READY, and on ONNX Runtime the same outputs as the BOOL
    mask, for partly masked rows and a row with no key to attend to (zeros: -1e4 would give a
    softmax over the masked keys; the constant is finite, as -inf would leave a plain softmax NaN)."""
    onnx_dtype = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}[dtype]
    original = _masked_attention_graph(onnx_dtype)
    assert tensorrt.readiness(original).verdict == "NOT READY"
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    assert lowering.additive_attention_masks(rewritten) == 3
    onnx.checker.check_model(rewritten, full_check=True)
    assert attention_mask_types(rewritten) == [onnx_dtype] * 3
    (where,) = [n for n in rewritten.graph.node if n.op_type == "Where"]  # shared by the two outer nodes
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    assert (inits[where.input[1]], inits[where.input[2]]) == (0, torch.finfo(dtype).min)  # finite, not -inf
    then_branch = next(a.g for a in rewritten.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node if n.op_type in ("Where", "Cast")] == \
        ["Where"] + ["Cast"] * (dtype != torch.float32)
    r = tensorrt.readiness(rewritten)
    assert r.ready, r.markdown()
    assert "BOOL" not in {o.op_type: o for o in r.ops}["Attention"].types

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g).to(dtype).numpy() for n in (3, 5, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)[None, None].numpy()
    feed = dict(q=q, k=k, v=v, mask=mask, c=np.array(True))
    want, got = (onnxruntime.InferenceSession(m.SerializeToString()).run(None, feed) for m in (original, rewritten))
    for w, o in zip(want, got):
        torch.testing.assert_close(torch.from_numpy(o), torch.from_numpy(w))
        assert (w[:, :, 1] == 0).all() and np.isfinite(o).all()  # ONNX Runtime's empty row: zeros


def test_bfloat16_attention_gets_a_float32_where_cast_to_bfloat16_exactly():
    """ONNX Runtime's Where has no bfloat16: the mask is built in float32, with bfloat16's lowest
    finite value (exact in float32, so the Cast neither rounds nor overflows to -inf)."""
    model = _masked_attention_graph(TensorProto.BFLOAT16)
    assert lowering.additive_attention_masks(model) == 3
    assert attention_mask_types(model) == [TensorProto.BFLOAT16] * 3
    where = next(n for n in model.graph.node if n.op_type == "Where")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[where.input[1]] == 0 and inits[where.input[2]].dtype == np.float32
    lowest = torch.tensor(float(inits[where.input[2]])).to(torch.bfloat16)
    assert lowest.item() == torch.finfo(torch.bfloat16).min and torch.isfinite(lowest)
    cast = next(n for n in model.graph.node if n.op_type == "Cast")
    assert cast.input[0] == where.output[0] and helper.get_attribute_value(cast.attribute[0]) == TensorProto.BFLOAT16


def test_only_the_tensorrt_target_rewrites_the_masked_attention(tmp_path):
    """apt-dense-tiny's past/present graph: BOOL masks for --target onnx (ONNX Runtime runs them),
    float masks for --target tensorrt, READY, and validated on ONNX Runtime (left-padded rows
    included) in the rewritten form."""
    result = api.compile_model("apt-dense-tiny", tmp_path / "trt", target="tensorrt", **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    written = onnx.load(tmp_path / "trt" / api.MODEL_FILE)
    assert set(attention_mask_types(written)) == {TensorProto.FLOAT}
    assert result.readiness.ready, result.readiness.markdown()
    assert "NOT READY" not in (tmp_path / "trt" / "trt_readiness.md").read_text()
    (v,) = result.validations
    assert v.passed and v.runtime == "onnxruntime, model.onnx", v.table()
    assert any(r.inputs.startswith("unseen prefill, left padded") for r in v.rows)

    plain = api.compile_model("apt-dense-tiny", tmp_path / "onnx", target="onnx", validate_graph=False, **QUIET)
    assert plain.exit_code == api.EXIT_OK, plain.verdict
    assert set(attention_mask_types(onnx.load(tmp_path / "onnx" / api.MODEL_FILE))) == {TensorProto.BOOL}


def test_a_float16_model_gets_float16_masks_and_validates(tmp_path):
    ModelConfig.preset("apt-dense-tiny", n_layers=1).to_json(tmp_path / "dense.json")
    result = api.compile_model(str(tmp_path / "dense.json"), tmp_path, target="tensorrt", dtype="float16", **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    assert set(attention_mask_types(onnx.load(tmp_path / api.MODEL_FILE))) == {TensorProto.FLOAT16}
    assert result.readiness.ready and all(v.passed for v in result.validations), result.readiness.markdown()


@pytest.mark.parametrize("elem,scale,block,problem", [
    (TensorProto.FLOAT4E2M1, TensorProto.FLOAT, 16, None),  # NVFP4 (its FP8 scales dequantized first): TensorRT's FP4
    (TensorProto.FLOAT4E2M1, TensorProto.FLOAT, 32, "block_size 32"),
    (TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0, 32, "MXFP4"),
    (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E8M0, 32, None),  # MXFP8
    (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT, 32, "FP32 scales"),
    (TensorProto.INT4, TensorProto.FLOAT, 128, None),
    (TensorProto.INT4, TensorProto.FLOAT, 32, "block_size 32"),
])
def test_readiness_checks_block_quantization_attributes_and_scale_types(elem, scale, block, problem):
    w = helper.make_tensor("w", elem, [8, 128], [0] * 8 * 128)
    s = helper.make_tensor("s", scale, [8, 128 // block], [1] * (8 * 128 // block))
    model = _graph([helper.make_node("DequantizeLinear", ["w", "s"], ["d"], axis=1, block_size=block,
                                     output_dtype=TensorProto.FLOAT)],
                   [], [_vi("d", TensorProto.FLOAT, [8, 128])], [w, s], opset=24)
    (dq,) = tensorrt.readiness(model).ops
    if problem is None:
        assert dq.status != "unsupported", dq.notes
    else:
        assert dq.status == "unsupported" and any(problem in n for n in dq.notes), dq.notes


def test_external_weights_are_listed_and_the_readiness_check_reads_them(tmp_path, monkeypatch):
    from apt_hal.compile import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1024)  # as if the model were past 2 GB
    result = api.compile_model("apt-dense-tiny", tmp_path, target="tensorrt", kv_cache=False, **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["files"]["model.onnx.data"] > 100_000 > report["files"]["model.onnx"]
    assert result.readiness.ready, result.readiness.markdown()
    assert any(i.data_location == TensorProto.EXTERNAL for i in result.exported.model.graph.initializer)


def test_require_trt_fails_without_an_engine(tmp_path, capsys):
    code = cli.main(["--target", "tensorrt", "--model", "apt-dense-tiny", "--output", str(tmp_path), "--no-validate",
                     "--require-trt"])
    out = capsys.readouterr().out
    if TRT_AVAILABLE:
        assert code == api.EXIT_OK and "TensorRT build: OK" in out
    else:
        assert code == api.EXIT_TRT_REQUIRED
        assert f"TensorRT build: SKIPPED ({TRT_WHY}" in out and "(exit 5)" in out
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "build_trt.sh").exists()
