"""Two autograd functions that keep less for backward than autograd would, with the same values and gradients
bit for bit (the same kernels on the same operands; tests/test_ops.py compares them with plain autograd).

    swiglu(g, u) = silu(g) * u
        autograd keeps g (for silu's backward), silu(g) and u (for the product's): three (N, I) tensors.
        This keeps g and u and recomputes silu(g) in backward: one (N, I) tensor less per FFN.

    lora_in(x, A, rebuild, *sources) = x Aᵀ            (LoRA's first factor: lora.first_factor)
        autograd keeps x for A's gradient. When x is cheap to recompute from tensors backward keeps anyway, this
        keeps those sources and rebuilds x in backward. Used for the down projection's input silu(g) * u (swiglu
        keeps g and u): one (N, I) tensor less per FFN.

In the mid-shape LoRA step with half the positions audio (higgs_min/bench/peer.py, saved row) what a step keeps
for backward went from 645 to 440 MiB with these and the DualFFN routing by gathers (model.DecoderLayer); the
recomputation is elementwise (silu and a product). Rebuilding the norms' outputs for the q, k, v and gate, up
factors as well (from the input each norm keeps) reached 381 MiB but cost 2-3% of the step's time in a
same-process A/B, so it is not done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        # what autograd computes for F.silu(g) * u: mul's two gradients, then silu_backward at g
        dg = torch.ops.aten.silu_backward(dy * u, g) if ctx.needs_input_grad[0] else None
        du = dy * F.silu(g) if ctx.needs_input_grad[1] else None
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, g and u (…, I) -> (…, I), keeping only g and u for backward."""
    return _SwiGLU.apply(g, u)


def swiglu_value(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """swiglu's value without a graph (what lora_in rebuilds the down projection's input with)."""
    return F.silu(g) * u


class _LoRAIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rebuild, *sources):
        ctx.rebuild, ctx.shape = rebuild, x.shape
        ctx.save_for_backward(weight, *sources)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, da):
        weight, *sources = ctx.saved_tensors
        da2 = da.reshape(-1, da.shape[-1])  # (N, r): linear's backward runs on the rows flattened
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = da2.mm(weight).view(ctx.shape)  # (N, in), as mm's backward: grad @ (Aᵀ)ᵀ
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                x = ctx.rebuild(*sources).reshape(-1, ctx.shape[-1])  # (N, in), equal to the forward's x
            dw = x.t().mm(da2).t()  # (r, in), as mm's backward: (xᵀ grad) for Aᵀ, transposed back
        return (dx, dw, None) + (None,) * len(sources)


def lora_in(x: torch.Tensor, weight: torch.Tensor, rebuild, *sources: torch.Tensor) -> torch.Tensor:
    """x (…, in) @ weight (r, in)ᵀ -> (…, r), keeping `sources` instead of x for backward.

    INVARIANT (the caller's): rebuild(*sources) equals x bit for bit, and x's gradient reaches the sources through
    the graph that made x (lora_in gives none to the sources themselves)."""
    return _LoRAIn.apply(x, weight, rebuild, *sources)
