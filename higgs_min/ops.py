"""Autograd functions that keep less for backward, or do less in it, than autograd would, with the same values and
gradients bit for bit (the same kernels on the same operands; tests/test_ops.py compares them with plain autograd).

    swiglu(g, u) = silu(g) * u
        autograd keeps g (for silu's backward), silu(g) and u (for the product's): three (N, I) tensors.
        This keeps g and u and recomputes silu(g) in backward: one (N, I) tensor less per FFN.

    swiglu_lora_in(g, u, A) = (h, h Aᵀ) with h = swiglu(g, u)     (h: the down projection's input; h Aᵀ: its
        LoRA first factor, lora.first_factor)
        autograd keeps h for A's gradient besides what swiglu keeps. This keeps g and u only and rebuilds h in
        backward: one (N, I) tensor less per FFN. silu(g) is computed once in backward for both the rebuilt h
        and the product's gradient (separate functions computed it twice: 16 (N, I) silus per mid-shape step).

    permute_rows(x, order, inverse) = x[order]            (the DualFFN layers' gathers, model.DecoderLayer)
        backward gathers the gradient back (dy[inverse]) instead of scattering it into zeros.

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


class _SwiGLULoRAIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        h = F.silu(g) * u  # (…, I)
        return h, F.linear(h.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, dh, da):
        g, u, weight = ctx.saved_tensors
        dw = None
        if da is not None:
            da2 = da.reshape(-1, da.shape[-1])  # (N, r): linear's backward runs on the rows flattened
            # h's gradient from A's product, added to the one from h's other use (the down projection's base) as
            # autograd would add two consumers' gradients (two terms: the order does not change the sum)
            dx = da2.mm(weight).view(g.shape).to(g.dtype)  # (…, I), as mm's backward: grad @ (Aᵀ)ᵀ
            dh = dx if dh is None else dh + dx
        s = F.silu(g)  # (…, I): once, for A's rebuilt input and for the product's gradient
        if da is not None and ctx.needs_input_grad[2]:
            h = (s * u).to(weight.dtype).reshape(-1, g.shape[-1])  # (N, I), equal to the forward's h
            dw = h.t().mm(da2).t()  # (r, I), as mm's backward: (hᵀ grad) for Aᵀ, transposed back
            del h
        # what autograd computes for F.silu(g) * u: mul's two gradients, then silu_backward at g
        dg = torch.ops.aten.silu_backward(dh * u, g) if ctx.needs_input_grad[0] else None
        du = dh * s if ctx.needs_input_grad[1] else None
        return dg, du, dw


def swiglu_lora_in(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g, u (…, I), weight A (r, I) -> (h, a): h = silu(g) * u (…, I) and a = h Aᵀ in A's dtype (…, r), LoRA's
    first factor of the projection that reads h (model.MLP's down_proj), keeping only g, u and A for backward.

    Backward computes silu(g) once for both of its uses (A's gradient needs h, the product's gradient silu(g)), and
    adds h's two gradients (A's product, the caller's other use of h) itself."""
    return _SwiGLULoRAIn.apply(g, u, weight)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        return dy[inverse], None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x (N, …)[order] for a permutation `order` of 0..N-1 with x[order][inverse] == x (model.dual_ffn_routing).

    Its gradient is the gradient gathered back, dy[inverse], where autograd's indexing backward scatters dy into a
    zero tensor (a fill and an accumulating index_put: 0 + dy is dy, so the same numbers)."""
    return _PermuteRows.apply(x, order, inverse)
