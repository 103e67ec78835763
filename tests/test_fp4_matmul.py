"""The fp4_matmul contract: y = x @ dequantize(w)^T + bias, through apt_hal.ops (the policy's
implementation; the reference on CPU), checked against float64 arithmetic on the exact MXFP4 values."""

import math

import pytest
import torch

import apt_hal
from apt_hal import mxfp4, ops

K, N = 96, 40

# The result is the exact product rounded once to x's dtype, after float32 accumulation: half an
# ulp of the output dtype relative (bf16 2^-8, fp16 2^-11, fp32 2^-24 plus accumulation), and an
# absolute float32 accumulation error for outputs near 0 (K=96 products of magnitude <~ 20).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2.0 ** -8, atol=1e-4),
       torch.float16: dict(rtol=2.0 ** -11, atol=1e-4)}


def random_weight(n=N, k=K, seed=0):
    """MXFP4 weight whose rows span several scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 5, (n, 1), generator=g).float())
    return mxfp4.quantize(w)


def expected(x, packed, scales, bias=None):
    y = x.double() @ mxfp4.dequantize(packed, scales).double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_product(dtype, lead, with_bias):
    packed, scales = random_weight()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    y = ops.fp4_matmul(x, packed, scales, bias)
    assert y.dtype == dtype and y.shape == (*lead, N)
    torch.testing.assert_close(y.double(), expected(x, packed, scales, bias), **TOL[dtype], equal_nan=False)


def test_empty_rows():
    packed, scales = random_weight()
    for shape in [(0, K), (2, 0, K)]:
        y = ops.fp4_matmul(torch.randn(shape, dtype=torch.bfloat16), packed, scales)
        assert y.shape == (*shape[:-1], N) and y.dtype == torch.bfloat16


@pytest.mark.skipif(not mxfp4.HAS_TORCH_FP4, reason="this torch has no float4_e2m1fn_x2 / float8_e8m0fnu")
def test_torch_fp4_dtypes_are_accepted():
    packed, scales = random_weight()
    x = torch.randn(3, K)
    tp, ts = mxfp4.to_torch_dtypes(packed, scales)
    assert torch.equal(ops.fp4_matmul(x, tp, ts), ops.fp4_matmul(x, packed, scales))


# ---- NaN and Inf ---------------------------------------------------------------------------


def test_nan_in_x_poisons_exactly_its_row():
    packed, scales = random_weight()
    x = torch.randn(4, K)
    x[2, 17] = math.nan
    y = ops.fp4_matmul(x, packed, scales)
    rows = torch.zeros(4, 1, dtype=torch.bool)
    rows[2] = True
    assert torch.equal(torch.isnan(y), rows.expand(4, N))


def test_nan_scale_poisons_exactly_the_outputs_using_its_block():
    packed, scales = random_weight()
    scales = scales.clone()
    scales[7, 1] = 0xFF  # row 7, elements 32..63
    x = torch.randn(4, K)
    x[1, 32:64] = 0.0  # 0 * NaN is still NaN
    y = ops.fp4_matmul(x, packed, scales)
    cols = torch.zeros(1, N, dtype=torch.bool)
    cols[0, 7] = True
    assert torch.equal(torch.isnan(y), cols.expand(4, N))


def test_inf_in_x_propagates_as_in_ieee_arithmetic():
    packed, scales = random_weight()
    codes = mxfp4.unpack_codes(packed)
    codes[:, 5] = torch.where(torch.arange(N) % 2 == 0, 4, 12)  # +2 or -2 times the scale, by column
    codes[3, 5] = 0  # a zero weight: Inf * 0 = NaN
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    x = torch.randn(2, K)
    x[1, 5] = math.inf
    y, ref = ops.fp4_matmul(x, packed, scales), expected(x, packed, scales)
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(y), mask(ref))
    assert torch.isnan(y[1, 3]) and torch.isposinf(y[1, 0]) and torch.isneginf(y[1, 1]) and torch.isfinite(y[0]).all()


# ---- errors --------------------------------------------------------------------------------


def _bad_calls():
    packed, scales = random_weight()
    x = torch.randn(3, K)
    bias = torch.randn(N)
    nc_packed = torch.empty(K // 2, N, dtype=torch.uint8).t()
    nc_scales = torch.empty(K // 32, N, dtype=torch.uint8).t()
    return [
        ((x.double(), packed, scales), r"argument 'x' must have dtype float32 or bfloat16 or float16, got float64"),
        (([1.0] * K, packed, scales), r"argument 'x' must be a torch.Tensor, got list"),  # a ContractError too
        ((torch.randn(3, 48), packed[:, :24], scales[:, :1]), r"'x' \(K=48\) must be a multiple of 32"),
        ((x, packed.to(torch.int8), scales), r"argument 'w_packed' must have dtype uint8"),
        ((x, packed.unsqueeze(0), scales), r"argument 'w_packed' must have 2 dimensions"),
        ((x, scales, scales), r"argument 'w_packed' must have .*K/2.*\b48\b.*got"),
        ((x, packed, scales.float()), r"argument 'w_scales' must have dtype uint8"),
        ((x, packed, scales[:, :2]), r"argument 'w_scales' must have .*K/32.*\b3\b.*got"),
        ((x, packed, scales[:-1]), r"argument 'w_scales' must have .*\b40\b.*got"),
        ((x, nc_packed, scales), r"argument 'w_packed' must be contiguous"),
        ((x, packed, nc_scales), r"argument 'w_scales' must be contiguous"),
        ((x, packed, scales, bias.half()), r"argument 'bias' must have dtype float32, got float16"),
        ((x, packed, scales, bias[None]), r"argument 'bias' must have 1 dimensions"),
        ((x, packed, scales, bias[:-1]), r"argument 'bias' must have .*\b40\b.*got"),
        ((x, packed.to("meta"), scales), r"argument 'w_packed' is on meta but 'x' is on cpu"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors_name_the_argument_and_the_expectation(case):
    args, message = _bad_calls()[case]
    with pytest.raises(apt_hal.ContractError, match=r"^apt_hal\.fp4_matmul: .*" + message):
        ops.fp4_matmul(*args)


def test_errors_through_the_torch_dispatcher():
    packed, scales = random_weight()
    with pytest.raises(apt_hal.ContractError, match="must be a multiple of 32"):
        torch.ops.apt_hal.fp4_matmul(torch.randn(2, 48), packed[:, :24], scales[:, :1])


# ---- autograd, compile, export ---------------------------------------------------------------


def test_gradients_of_x_and_bias():
    packed, scales = random_weight()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    bias = torch.randn(N, generator=g, requires_grad=True)
    dy = torch.randn(2, 3, N, generator=g)
    ops.fp4_matmul(x, packed, scales, bias).backward(dy)
    w = mxfp4.dequantize(packed, scales, torch.float64)
    torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        packed, scales = random_weight()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = torch.nn.Parameter(torch.randn(N))

    def forward(self, x):
        return ops.fp4_matmul(x, self.packed, self.scales, self.bias)


def _targets(graph):
    return {n.target for n in graph.nodes if n.op == "call_function"}


def test_torch_compile_fullgraph_keeps_the_op():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    layer = _Layer()
    x = torch.randn(4, K, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    y = compiled(x)
    assert torch.ops.apt_hal.fp4_matmul.default in _targets(graphs[0].graph)  # forward graph, after AOT
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, mxfp4.dequantize(layer.packed, layer.scales).sum(0).expand(4, K),
                               rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_op_with_a_dynamic_batch():
    layer = _Layer()
    x = torch.randn(4, K)
    ep = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: torch.export.Dim("m")}})
    assert torch.ops.apt_hal.fp4_matmul.default in _targets(ep.graph)
    x7 = torch.randn(7, K)
    torch.testing.assert_close(ep.module()(x7), layer(x7), rtol=0, atol=0)
