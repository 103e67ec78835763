"""cuda-triton rotary / rotary_ against the contract's reference.

Runs the Triton kernel on a GPU when there is one, else in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1). The kernel computes in float32 and rounds once, like the reference, so the
results agree to one rounding of the output dtype: float32 to 1e-6 (the GPU may fuse a*cos - b*sin
into an FMA), float16 to one ulp (rtol 2^-10), bfloat16 to one ulp (rtol 2^-7: the GPU rounds to
nearest even, the interpreter truncates on fp32 -> bf16 stores, so both are within one ulp).
"""

import pytest
import torch

import apt_hal
from apt_hal import ops, registry
from apt_hal.backends.cuda_triton import rotary as triton_rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2 ** -10, 1e-5), torch.bfloat16: (2 ** -7, 1e-5)}

# (B, S, Hq, Hk, D, R): decode, GQA, head_dim not a power of two, partial rotary with R/2 not a
# power of two, MQA with many query heads.
CASES = [(3, 1, 4, 2, 64, 64), (2, 5, 6, 2, 80, 80), (1, 7, 3, 3, 96, 48), (2, 3, 9, 1, 32, 16)]
if DEV == "cuda":
    CASES += [(64, 1, 32, 8, 128, 128), (2, 1000, 32, 8, 128, 128), (1, 333, 28, 4, 128, 64)]


def make_inputs(b, s, hq, hk, d, r, dtype, seed, pos_dtype=torch.int64, positions=97):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g).to(dtype)
    k = torch.randn(b, s, hk, d, generator=g).to(dtype)
    pos = torch.randint(0, positions, (b, s), generator=g, dtype=pos_dtype)  # unsorted, with repeats
    angles = torch.rand(positions, r // 2, generator=g) * 6.3
    cache = torch.cat([angles.cos(), angles.sin()], dim=1) * 1.1  # an attention factor, as YaRN has
    return q.to(DEV), k.to(DEV), pos.to(DEV), cache.to(DEV)


def assert_matches(out, ref):
    rtol, atol = TOL[ref.dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    assert rel <= rtol, f"relative-norm error {rel:.2e} > {rtol:.2e}"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=False)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, dtype, style):
    pos_dtype = torch.int32 if sum(case) % 2 else torch.int64
    q, k, pos, cache = make_inputs(*case, dtype, seed=sum(case), pos_dtype=pos_dtype)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, style)
    with apt_hal.use("cuda-triton", strict=True):
        q_out, k_out = ops.rotary(q, k, pos, cache, style)
        q_in, k_in = q.clone(), k.clone()
        assert ops.rotary_(q_in, k_in, pos, cache, style) is None
    for out, ref in ((q_out, q_ref), (k_out, k_ref), (q_in, q_ref), (k_in, k_ref)):
        assert_matches(out, ref)
    assert q_out.is_contiguous() and k_out.is_contiguous()


@pytest.mark.parametrize("k_layout", ["fused_qkv", "bhsd"])
def test_strided_views(k_layout):
    """q (and k) as views into one fused qkv projection output (token stride > heads x head_dim),
    or k a [B, H, S, D] tensor seen as [B, S, H, D]. Results land in the views; nothing else moves."""
    b, s, hq, hk, d = 2, 5, 4, 2, 64
    q_, k_, pos, cache = make_inputs(b, s, hq, hk, d, d, torch.bfloat16, seed=1)
    qkv = torch.cat([q_.flatten(2), k_.flatten(2), torch.randn_like(k_.flatten(2))], dim=2)
    q = qkv[..., : hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d)
    if k_layout == "bhsd":
        k = k_.transpose(1, 2).contiguous().transpose(1, 2)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, "neox")
    qkv_before, k_before = qkv.clone(), k.clone()
    with apt_hal.use("cuda-triton", strict=True):
        q_out, k_out = ops.rotary(q, k, pos, cache, "neox")
        assert torch.equal(qkv, qkv_before) and torch.equal(k, k_before)  # out of place: inputs intact
        ops.rotary_(q, k, pos, cache, "neox")
    for out, ref in ((q_out, q_ref), (k_out, k_ref), (q, q_ref), (k, k_ref)):
        assert_matches(out, ref)
    untouched = (hq + hk) * d if k_layout == "fused_qkv" else hq * d
    assert torch.equal(qkv[..., untouched:], qkv_before[..., untouched:])  # v (and k's slot) never written


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_partial_rotary_tail_is_bit_exact(style):
    q, k, pos, cache = make_inputs(2, 3, 3, 2, 96, 32, torch.bfloat16, seed=3)
    with apt_hal.use("cuda-triton", strict=True):
        q_out, k_out = ops.rotary(q, k, pos, cache, style)
        q_in, k_in = q.clone(), k.clone()
        ops.rotary_(q_in, k_in, pos, cache, style)
    for out in (q_out, q_in):
        assert torch.equal(out[..., 32:], q[..., 32:])
    for out in (k_out, k_in):
        assert torch.equal(out[..., 32:], k[..., 32:])


@pytest.mark.parametrize("shape", [(0, 4, 4, 2), (3, 0, 4, 2), (2, 3, 0, 2), (2, 3, 4, 0)],
                         ids=["B=0", "S=0", "Hq=0", "Hk=0"])
def test_empty_inputs(shape):
    b, s, hq, hk = shape
    q, k, pos, cache = make_inputs(b, s, hq, hk, 64, 64, torch.bfloat16, seed=4)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache)
    with apt_hal.use("cuda-triton", strict=True):
        q_out, k_out = ops.rotary(q, k, pos, cache)
        assert ops.rotary_(q, k, pos, cache) is None
    assert q_out.shape == (b, s, hq, 64) and k_out.shape == (b, s, hk, 64)
    for out, ref in ((q_out, q_ref), (k_out, k_ref), (q, q_ref), (k, k_ref)):
        if ref.numel():  # the tensor that has heads is still rotated
            assert_matches(out, ref)


@pytest.mark.parametrize("heads", [(1, 1), (2, 4), None], ids=["1x1", "2x4", "auto"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_every_tiling_writes_every_element(heads, style):
    """Outputs poisoned with NaN: any element a tiling misses fails. Covers one head per program
    (the decode tiling on a GPU) as well as blocks of heads with masked remainders."""
    q, k, pos, cache = make_inputs(2, 3, 5, 3, 80, 48, torch.float32, seed=5)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    triton_rotary.launch_rotary(q, k, pos, cache, style, q_out, k_out, heads=heads)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, style)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)


def test_the_triton_implementation_is_what_runs():
    q, k, pos, cache = make_inputs(2, 3, 4, 2, 64, 64, torch.bfloat16, seed=6)
    args = (q, k, pos, cache, "gptj")
    with apt_hal.use("cuda-triton", strict=True):
        assert registry.select(ops.rotary, q.device.type, args) is triton_rotary.rotary_triton
        assert registry.select(ops.rotary_, q.device.type, args) is triton_rotary.rotary_triton_
        via_op = ops.rotary(*args)
    direct = triton_rotary.rotary_triton(*args)
    traceable = torch.ops.apt_hal_triton.rotary(*args)
    for a, b, c in zip(via_op, direct, traceable):
        assert torch.equal(a, b) and torch.equal(a, c)
    q2, k2 = q.clone(), k.clone()
    torch.ops.apt_hal_triton.rotary_(q2, k2, pos, cache, "gptj")
    assert torch.equal(q2, via_op[0]) and torch.equal(k2, via_op[1])


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="torch.compile traces into Triton kernels only on a GPU")
def test_torch_compile_traces_the_triton_ops():
    q, k, pos, cache = make_inputs(4, 33, 8, 2, 128, 128, torch.bfloat16, seed=7)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, "neox")

    def step(q, k, pos, cache):
        q_out, k_out = torch.ops.apt_hal_triton.rotary(q, k, pos, cache, "neox")
        q2, k2 = q.clone(), k.clone()
        torch.ops.apt_hal_triton.rotary_(q2, k2, pos, cache, "neox")
        return q_out, k_out, q2, k2

    outs = torch.compile(step, fullgraph=True)(q, k, pos, cache)
    for out, ref in zip(outs, (q_ref, k_ref, q_ref, k_ref)):
        assert_matches(out, ref)
