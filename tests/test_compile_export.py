"""A small module using all four contracts survives torch.compile(fullgraph=True) and torch.export,
keeps every apt_hal op as one node, and trains: gradients flow through fp4_matmul (activations),
moe_dispatch and rotary, in eager and compiled alike."""

import pytest
import torch

from apt_hal import mxfp4, ops

D, HEADS, HEAD_DIM, FF, EXPERTS, TOP_K = 64, 2, 32, 64, 4, 2


class AllOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        packed, scales = mxfp4.quantize(torch.randn(D, D, generator=g) * 0.2)
        self.register_buffer("w_packed", packed)
        self.register_buffer("w_scales", scales)
        self.router = torch.nn.Parameter(torch.randn(EXPERTS, D, generator=g) * 0.2)
        self.w_up = torch.nn.Parameter(torch.randn(EXPERTS, 2 * FF, D, generator=g) * 0.1)
        self.w_down = torch.nn.Parameter(torch.randn(EXPERTS, D, FF, generator=g) * 0.1)
        ang = torch.arange(16).float()[:, None] / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("cos_sin", torch.cat([ang.cos(), ang.sin()], dim=1))

    def forward(self, x, positions, pool, slots, block_table):
        b, s, _ = x.shape
        h = ops.fp4_matmul(x, self.w_packed, self.w_scales)
        q = h.view(b, s, HEADS, HEAD_DIM)
        q, k = ops.rotary(q, q, positions, self.cos_sin)
        ops.paged_write(pool, k.reshape(b * s, HEADS, HEAD_DIM).detach(), slots)
        cached = ops.paged_gather(pool, block_table)
        moe = ops.moe_dispatch(q.reshape(b, s, D), x @ self.router.T, self.w_up, self.w_down, top_k=TOP_K,
                               renormalize=True)
        return moe.output.square().mean() + moe.load_balance_loss * 0.01 + moe.z_loss * 0.001 + cached.mean()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, D, generator=g, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    pool = torch.zeros(4, 4, HEADS, HEAD_DIM)
    slots = torch.arange(8)
    block_table = torch.tensor([[0, 1]])
    return x, positions, pool, slots, block_table


def _grads(model, fn):
    model.zero_grad()
    args = _inputs()
    loss = fn(*args)
    loss.backward()
    return loss.detach(), args[0].grad, model.w_up.grad, model.router.grad


def test_eager_gradients_flow_through_every_differentiable_op():
    model = AllOps()
    loss, gx, gup, grouter = _grads(model, model)
    assert torch.isfinite(loss)
    for g in (gx, gup, grouter):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_forward_and_backward():
    model = AllOps()
    eager = _grads(model, model)
    compiled = _grads(model, torch.compile(model, fullgraph=True))  # fullgraph: any graph break raises
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_export_keeps_every_apt_hal_op():
    model = AllOps()
    args = _inputs()
    ep = torch.export.export(model, (args[0].detach(), *args[1:]))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("fp4_matmul", "rotary", "paged_write", "paged_gather", "moe_route", "moe_permute",
                 "moe_experts", "moe_combine"):
        assert f"apt_hal.{name}.default" in targets, name
    fresh = _inputs()
    torch.testing.assert_close(ep.module()(fresh[0].detach(), *fresh[1:]),
                               model(_inputs()[0].detach(), *_inputs()[1:]), rtol=1e-5, atol=1e-6)
