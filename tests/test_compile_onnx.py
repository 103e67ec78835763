"""apt-compile --target onnx: every apt_hal op alone and one small model of each family export through
torch.export + torch.onnx.export(dynamo=True) with the lowering table, pass the full ONNX checker,
and match eager PyTorch on ONNX Runtime's CPU provider, on shapes the export never saw."""

import math

import onnx
import pytest
import torch

from apt_hal import mxfp4, ops
from apt_hal.compile import api, cli, lowering, validate
from apt_hal.compile.export import OP_TARGETS, export_onnx
from apt_hal.compile.validate import InputSet

QUIET = dict(log=lambda *a: None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check(tmp_path, module, sets, names, *, op, dynamic=None, opset=None, target="onnx", runtime="onnxruntime",
           reduction=1):
    """Export ``module`` on the first input set, validate on all of them; return the export."""
    e = export_onnx(module, sets[0].args, tmp_path / f"{op}.onnx", target=target, opset=opset, dynamic=dynamic,
                    output_names=names, **QUIET)
    onnx.checker.check_model(onnx.load(e.path), full_check=True)
    assert e.model.ir_version == e.target.profile.ir_version(e.target.opset)
    v = validate.validate(e.path, module, sets, e.output_names, op=op, runtime=runtime, reduction=reduction)
    assert v.passed, v.table()
    assert {r.inputs.split(" [")[0] for r in v.rows} == {s.label for s in sets}  # every set ran
    return e


def _op_types(e):
    return {n.op_type for n in e.model.graph.node}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_every_op_has_a_lowering_in_every_profile():
    for op in ops.ALL_OPS:
        name = "rotary" if op.name == "rotary_" else op.name  # in place: exported through its twin
        assert name in OP_TARGETS, name
        for profile, table in lowering.LOWERINGS.items():
            assert name in table and table[name].how, (profile, name)
    assert set(lowering.LOWERINGS) == set(lowering.PROFILES)


def test_target_resolution_rejects_what_a_runtime_cannot_take():
    assert lowering.resolve_target("onnx").fp4 == "decode"
    assert lowering.resolve_target("tensorrt").fp4 == "decode"  # TensorRT documents no MXFP4 DequantizeLinear
    assert lowering.resolve_target("tensorrt", fp4="qdq").fp4 == "qdq"
    for bad in (dict(profile="onnx", opset=17), dict(profile="tensorrt", opset=25), dict(profile="coreml"),
                dict(profile="onnx", fp4="qdq"), dict(profile="tensorrt", opset=23, fp4="qdq")):
        with pytest.raises(ValueError):
            lowering.resolve_target(**bad)


# ---------------------------------------------------------------------------------------------
# fp4_matmul
# ---------------------------------------------------------------------------------------------


class Fp4Linear(torch.nn.Module):
    def __init__(self, n=48, k=96, nan_block=True):
        super().__init__()
        g = _gen(0)
        w = torch.randn(n, k, generator=g)
        if nan_block:
            w[5, 32:64] = float("nan")  # a NaN scale: every output of row 5 is NaN
        packed, scales = mxfp4.quantize(w)
        self.register_buffer("w_packed", packed)
        self.register_buffer("w_scales", scales)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=g))

    def forward(self, x):
        return ops.fp4_matmul(x, self.w_packed, self.w_scales, self.bias.to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_matmul_decodes_packed_weights_in_the_graph(tmp_path, dtype):
    m = Fp4Linear()
    sets = [InputSet(label, (torch.randn(*shape, 96, generator=_gen(i)).to(dtype),))
            for i, (label, shape) in enumerate([("seen", (2, 3)), ("unseen", (5, 1)), ("unseen", (1, 7))])]
    e = _check(tmp_path, m, sets, ["y"], op="fp4_matmul", dynamic={"x": {0: "b", 1: "m"}}, reduction=96)
    # The weights stay packed (4.25 bits each) and are decoded at run time: no float copy of W.
    inits = {i.name: i for i in e.model.graph.initializer}
    assert inits["w_packed"].data_type == onnx.TensorProto.UINT8 and list(inits["w_packed"].dims) == [48, 48]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and math.prod(i.dims) >= 48 * 96 for i in inits.values())
    assert {"Gather", "MatMul"} <= _op_types(e)


def test_decode_tables_are_the_mxfp4_spec_exactly():
    codes = torch.arange(256, dtype=torch.uint8).reshape(128, 2)  # every byte value
    scales = torch.tensor([[0], [1], [127], [254], [255]] * 26, dtype=torch.uint8)[:128]
    packed = codes.repeat(1, 16)  # [128, 32] bytes -> K = 64: two blocks per row
    scales = torch.cat([scales, scales.flip(0)], dim=1)
    expected = mxfp4.dequantize(packed, scales)
    pairs = torch.from_numpy(lowering._byte_table())[packed.long()].reshape(128, 2, 32)
    scale = torch.from_numpy(lowering._scale_table())[scales.long()]
    got = (pairs * scale[..., None]).reshape(128, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------


class Rotary(torch.nn.Module):
    def __init__(self, rotary_dim, style, inplace=False):
        super().__init__()
        self.style, self.inplace = style, inplace
        angles = torch.arange(64).float()[:, None] * torch.rand(rotary_dim // 2, generator=_gen(1))[None]
        self.register_buffer("cache", torch.cat([angles.cos(), angles.sin()], dim=1))

    def forward(self, q, k, positions):
        if self.inplace:
            q, k = q.clone(), k.clone()
            ops.rotary_(q, k, positions, self.cache, self.style)
            return q, k
        return ops.rotary(q, k, positions, self.cache, self.style)


def _rotary_inputs(b, s, dtype, seed):
    g = _gen(seed)
    return (torch.randn(b, s, 4, 32, generator=g).to(dtype), torch.randn(b, s, 2, 32, generator=g).to(dtype),
            torch.randint(0, 64, (b, s), generator=g, dtype=torch.int32))


@pytest.mark.parametrize("style,dtype,opset,rotary_dim,inplace,standard", [
    ("neox", torch.float32, 23, 32, False, True),   # RotaryEmbedding
    ("gptj", torch.float32, 23, 16, False, True),   # RotaryEmbedding, partial, interleaved
    ("gptj", torch.float32, 18, 16, True, False),   # no RotaryEmbedding before 23; rotary_ in place
    ("neox", torch.bfloat16, 23, 16, False, False),  # bf16: the float32 decomposition
    ("gptj", torch.float16, 23, 32, False, False),
])
def test_rotary(tmp_path, style, dtype, opset, rotary_dim, inplace, standard):
    m = Rotary(rotary_dim, style, inplace)
    sets = [InputSet("seen", _rotary_inputs(2, 5, dtype, 0)), InputSet("unseen", _rotary_inputs(3, 9, dtype, 1)),
            InputSet("unseen", _rotary_inputs(1, 1, dtype, 2))]
    axes = {0: "batch", 1: "seq"}
    e = _check(tmp_path, m, sets, ["q_out", "k_out"], op="rotary", opset=opset,
               dynamic={"q": axes, "k": axes, "positions": axes})
    assert ("RotaryEmbedding" in _op_types(e)) == standard
    if dtype != torch.float32:  # the decomposition is the reference's arithmetic: bit for bit
        got = validate.run_graph(e.path, sets[1].args)
        for g, r in zip(got, m(*sets[1].args)):
            assert torch.equal(g, r)


# ---------------------------------------------------------------------------------------------
# moe_dispatch (route, permute, experts, combine)
# ---------------------------------------------------------------------------------------------


class MoE(torch.nn.Module):
    def __init__(self, experts=4, d=64, ffn=32, top_k=2, mxfp4_weights=False, bias=False, **kwargs):
        super().__init__()
        g = _gen(3)
        up = ffn if kwargs.get("activation") == "gelu" else 2 * ffn
        w_up, w_down = torch.randn(experts, up, d, generator=g) * 0.2, torch.randn(experts, d, ffn, generator=g) * 0.2
        if mxfp4_weights:
            (w_up, s_up), (w_down, s_down) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
            self.register_buffer("s_up", s_up)
            self.register_buffer("s_down", s_down)
        else:
            self.s_up = self.s_down = None
        self.register_buffer("w_up", w_up)
        self.register_buffer("w_down", w_down)
        self.b_up = torch.nn.Parameter(torch.randn(experts, up, generator=g) * 0.1) if bias else None
        self.b_down = torch.nn.Parameter(torch.randn(experts, d, generator=g) * 0.1) if bias else None
        self.kwargs = dict(top_k=top_k, **kwargs)

    def forward(self, x, router_logits):
        out = ops.moe_dispatch(x, router_logits, self.w_up, self.w_down, w_up_scales=self.s_up,
                               w_down_scales=self.s_down, b_up=self.b_up, b_down=self.b_down, **self.kwargs)
        return out.output, out.topk_ids, out.topk_weights, out.tokens_per_expert, out.dropped


def _moe_inputs(tokens, seed, experts=4):
    g = _gen(seed)
    return torch.randn(tokens, 64, generator=g), torch.randn(tokens, experts, generator=g)


MOE_CASES = {
    "mixtral": dict(scoring="softmax_topk", renormalize=True, activation="swiglu"),
    "gpt-oss-mxfp4": dict(scoring="topk_softmax", activation="gpt_oss_swiglu", mxfp4_weights=True, bias=True),
    "gelu-capacity": dict(scoring="softmax_topk", activation="gelu", capacity_factor=0.6),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_dispatch(tmp_path, case):
    m = MoE(**MOE_CASES[case])
    sets = [InputSet("seen", _moe_inputs(7, 0)), InputSet("unseen", _moe_inputs(13, 1)),
            InputSet("unseen", _moe_inputs(1, 2))]
    names = ["output", "topk_ids", "topk_weights", "tokens_per_expert", "dropped"]
    e = _check(tmp_path, m, sets, names, op="moe_dispatch",
               dynamic={"x": {0: "tokens"}, "router_logits": {0: "tokens"}})
    assert e.apt_hal_ops == {"moe_route": 1, "moe_permute": 1, "moe_experts": 1, "moe_combine": 1}
    assert "MoE" not in _op_types(e)  # com.microsoft.MoE computes another function
    if case == "gelu-capacity":  # the unseen sizes really dropped assignments, exactly as eager
        assert int(m(*sets[1].args)[4]) > 0


def test_moe_routing_ties_go_to_the_lower_expert_as_in_eager(tmp_path):
    m = MoE(**MOE_CASES["mixtral"])
    x = torch.randn(6, 64, generator=_gen(4))
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0], [3.0, 0.0, 3.0, 3.0],
                         [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 2.0, 1.0]])
    sets = [InputSet("seen", (x, tied)), InputSet("unseen", _moe_inputs(9, 5))]
    _check(tmp_path, m, sets, ["output", "topk_ids", "topk_weights", "tokens_per_expert", "dropped"],
           op="moe_dispatch", dynamic={"x": {0: "tokens"}, "router_logits": {0: "tokens"}})


# ---------------------------------------------------------------------------------------------
# paged_tensor
# ---------------------------------------------------------------------------------------------


class Paged(torch.nn.Module):
    def forward(self, pool, values, slot_mapping, block_table, src_ids, dst_ids):
        pool = pool.clone()
        ops.paged_write(pool, values, slot_mapping)
        gathered = ops.paged_gather(pool, block_table)
        dst = torch.zeros_like(pool)
        ops.paged_copy_blocks(pool, src_ids, dst, dst_ids)
        return pool, gathered, dst


def _paged_inputs(tokens, dtype, seed):
    g = _gen(seed)
    pool = torch.randn(6, 4, 2, 8, generator=g).to(dtype)
    slots = torch.randperm(24, generator=g)[:tokens]
    slots[0] = -1  # a padding token: writes nothing
    table = torch.tensor([[0, 3, -1], [5, 1, 2]])  # -1: a zero block
    return (pool, torch.randn(tokens, 2, 8, generator=g).to(dtype), slots, table, torch.tensor([1, 4]),
            torch.tensor([0, 5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_paged_ops_move_bytes_exactly(tmp_path, dtype):
    sets = [InputSet("seen", _paged_inputs(5, dtype, 0)), InputSet("unseen", _paged_inputs(11, dtype, 1))]
    e = _check(tmp_path, Paged(), sets, ["pool", "gathered", "dst"], op="paged_write",
               dynamic={"values": {0: "tokens"}, "slot_mapping": {0: "tokens"}})
    assert e.apt_hal_ops == {"paged_write": 1, "paged_gather": 1, "paged_copy_blocks": 1}
    assert validate.tolerance("paged_write", "pool", dtype).metric == "exact"


# ---------------------------------------------------------------------------------------------
# Models and the command line
# ---------------------------------------------------------------------------------------------


def _mxfp4_dense():
    from apt_hal.models import ModelConfig, build_model
    from apt_hal.nn import convert_model_to_mxfp4

    torch.manual_seed(0)
    return convert_model_to_mxfp4(build_model(ModelConfig.preset("apt-dense-tiny", tie_embeddings=False)))


@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny", "apt-oss-tiny", "apt-dense-tiny+MXFP4Linear"])
def test_model_exports_and_validates_on_unseen_shapes(tmp_path, preset):
    # The full-sequence logits graph (--no-kv-cache); the past/present graph: tests/test_compile_past.py.
    model = _mxfp4_dense() if preset.endswith("MXFP4Linear") else preset  # every Linear but lm_head: fp4_matmul
    result = api.compile_model(model, tmp_path, target="onnx", dynamic_batch=True, dynamic_seq=True, kv_cache=False,
                               **QUIET)
    assert result.exit_code == api.EXIT_OK, result.verdict
    (v,) = result.validations
    assert v.passed and v.runtime.startswith("onnxruntime"), v.table()
    shapes = {r.inputs for r in v.rows}
    assert any(s.startswith("unseen [") for s in shapes) and any(s.startswith("unseen, size 1 [1x1]") for s in shapes)
    exported = result.exported
    assert set(exported.dims) == {"batch", "seq"}
    graph_input = exported.model.graph.input[0]
    assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch", "seq"]
    if preset in ("apt-moe-tiny", "apt-oss-tiny"):
        assert {"moe_route", "moe_permute", "moe_experts", "moe_combine"} <= set(exported.apt_hal_ops)
    if preset in ("apt-oss-tiny", "apt-dense-tiny+MXFP4Linear"):  # packed codes in the graph, decoded at run time
        assert any(i.data_type == onnx.TensorProto.UINT8 for i in exported.model.graph.initializer)
    if preset.endswith("MXFP4Linear"):  # one fp4_matmul per converted layer
        from apt_hal.nn import MXFP4Linear

        assert exported.apt_hal_ops["fp4_matmul"] == sum(isinstance(m, MXFP4Linear) for m in model.modules()) > 0
    assert (tmp_path / "compile_report.json").exists()


def test_model_from_a_checkpoint_folder_or_a_config_file(tmp_path):
    from apt_hal.models import ModelConfig, build_model
    from apt_hal.models.hf import save_pretrained

    torch.manual_seed(1)
    save_pretrained(build_model(ModelConfig.preset("apt-dense-tiny")), tmp_path / "hf")
    result = api.compile_model(str(tmp_path / "hf"), tmp_path / "out", dynamic_seq=True, **QUIET)
    assert result.exit_code == api.EXIT_OK and result.validations[0].passed, result.verdict
    ModelConfig.preset("apt-moe-tiny", n_layers=1).to_json(tmp_path / "moe.json")
    model, what = api.load_model(str(tmp_path / "moe.json"))
    assert model.config.n_layers == 1 and "random weights" in what
    with pytest.raises(ValueError, match="not a preset"):
        api.load_model(str(tmp_path / "missing"))


def _break_rotary(monkeypatch):
    """A deliberately wrong lowering: rotary with the other pair layout (the most common RoPE bug)."""
    right = lowering.LOWERINGS["onnx"]["rotary"]

    def swapped(t, q, k, positions, cache, style="neox"):
        return right.translate(t, q, k, positions, cache, "gptj" if style == "neox" else "neox")

    monkeypatch.setitem(lowering.LOWERINGS["onnx"], "rotary", lowering.Lowering(swapped, "wrong on purpose"))


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    args = ["--target", "onnx", "--model", "apt-dense-tiny", "--output", str(tmp_path / "a")]
    assert cli.main(args + ["--opset", "17"]) == api.EXIT_USAGE
    assert cli.main(["--target", "onnx", "--model", "no-such-model", "--output", str(tmp_path)]) == api.EXIT_USAGE
    assert cli.main(args + ["--require-trt"]) == api.EXIT_USAGE  # TensorRT needs --target tensorrt

    _break_rotary(monkeypatch)  # a wrong lowering is caught by validation: exported, out of tolerance
    assert cli.main(args + ["--dynamic-seq"]) == api.EXIT_OUT_OF_TOLERANCE
    out = capsys.readouterr().out
    assert "FAIL" in out and "out of tolerance" in out

    def broken(t, *args, **kwargs):
        raise RuntimeError("no translation")

    monkeypatch.setitem(lowering.LOWERINGS["onnx"], "rotary", lowering.Lowering(broken, "raises"))
    assert cli.main(args + ["--no-validate"]) == api.EXIT_EXPORT_FAILED
    assert "no translation" in capsys.readouterr().out


def test_cli_help_and_lowering_table(capsys):
    help_text = cli.build_parser().format_help()
    assert "apt-compile --target onnx --model apt-moe-tiny" in help_text
    for code in ("0", "2", "3", "4", "5"):
        assert f"\n  {code}  " in help_text
    assert cli.main(["--list-lowerings"]) == 0
    listing = capsys.readouterr().out
    for profile, table in lowering.LOWERINGS.items():
        assert profile in listing and all(op in listing for op in table)
