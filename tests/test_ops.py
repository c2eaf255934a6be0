"""higgs_min/ops.py against plain autograd (the independent formulation): same values and gradients bit for bit,
and less kept for backward (counted with saved-tensor hooks); the DualFFN layer's routing against the direct
formula (both FFNs on every row, each row's own chosen by torch.where)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from higgs_min.lora import LoRALinear
from higgs_min.model import MLP, HiggsAudioModel, dual_ffn_routing
from higgs_min.ops import permute_rows, swiglu, swiglu_lora_in
from tests.conftest import micro_config


def _kept(fn):
    """(bytes of the distinct storages autograd keeps while fn() builds its graph, shapes of those tensors, fn())."""
    held = {}

    def pack(t):
        held.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(t.untyped_storage().nbytes() for t in held.values()), [tuple(t.shape) for t in held.values()], out


def _leaf(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_swiglu_equals_autograd_bitwise_and_keeps_one_tensor_less():
    g, u, dy = _leaf(7, 33, seed=0), _leaf(7, 33, seed=1), torch.randn(7, 33)
    kept_ref, _, ref = _kept(lambda: F.silu(g) * u)
    ref.backward(dy)
    ref_grads = g.grad.clone(), u.grad.clone()
    g.grad = u.grad = None
    kept, _, out = _kept(lambda: swiglu(g, u))
    out.backward(dy)
    assert torch.equal(out, ref) and torch.equal(g.grad, ref_grads[0]) and torch.equal(u.grad, ref_grads[1])
    assert kept_ref == 3 * 7 * 33 * 4 and kept == 2 * 7 * 33 * 4  # g, silu(g), u  vs  g, u
    g64, u64 = (t.double().detach().requires_grad_() for t in (g, u))
    assert torch.autograd.gradcheck(swiglu, (g64, u64))


@pytest.mark.parametrize("shape", [(9, 40), (2, 5, 40)])
def test_swiglu_lora_in_equals_autograd_bitwise_and_keeps_g_u_and_a_only(shape):
    """Plain autograd: h = silu(g) * u read by two consumers, A's product (LoRA's first factor) and a base linear
    (the down projection): values and the gradients of g, u and A bit for bit; kept: g, u and A (not h, silu(g))."""
    g, u = _leaf(*shape, seed=2), _leaf(*shape, seed=3)
    A, W = _leaf(4, 40, seed=4), torch.randn(6, 40)
    da, dy = torch.randn(*shape[:-1], 4), torch.randn(*shape[:-1], 6)

    def grads(fused: bool):
        g.grad = u.grad = A.grad = None
        if fused:
            h, a = swiglu_lora_in(g, u, A)
        else:
            h = F.silu(g) * u
            a = F.linear(h, A)
        torch.autograd.backward((a, F.linear(h, W)), (da, dy))
        return h.detach(), a.detach(), g.grad, u.grad, A.grad

    for ref, ours in zip(grads(False), grads(True)):
        assert torch.equal(ref, ours)
    kept, _, _ = _kept(lambda: swiglu_lora_in(g, u, A))
    assert kept == (g.numel() + u.numel() + A.numel()) * 4
    g64, u64, A64 = (t.double().detach().requires_grad_() for t in (g, u, A))
    assert torch.autograd.gradcheck(swiglu_lora_in, (g64, u64, A64))


def test_mlp_with_lora_down_keeps_no_copy_of_its_input():
    torch.manual_seed(0)
    mlp = MLP(16, 40).requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, LoRALinear(getattr(mlp, name), r=4, alpha=8))
    x = _leaf(6, 16, seed=5)
    _, shapes, out = _kept(lambda: mlp(x))
    out.sum().backward()
    # g and u: neither silu(g) nor silu(g) * u
    assert sorted(s for s in shapes if s[0] == 6 and s[-1] == 40) == [(6, 40), (6, 40)]


def test_permute_rows_equals_indexing_bitwise():
    """Autograd's x[order] (its backward scatters into zeros) against permute_rows (gathers back): the routing's
    permutation (dual_ffn_routing) of a mask; values and gradients bit for bit, and nothing kept but the index."""
    audio = torch.rand(3, 11, generator=torch.Generator().manual_seed(6)) < 0.4
    order, n_text, inverse = dual_ffn_routing(audio)
    x, dy = _leaf(33, 5, seed=7), torch.randn(33, 5)
    (ref,) = torch.autograd.grad(x[order], x, dy)
    kept, shapes, out = _kept(lambda: permute_rows(x, order, inverse))
    (ours,) = torch.autograd.grad(out, x, dy)
    assert torch.equal(out, x[order]) and torch.equal(ours, ref) and shapes == [(33,)]
    assert torch.equal(permute_rows(out, inverse, order), x)


def test_dual_ffn_routing_equals_both_ffns_on_every_row():
    """Direct formula (official HiggsAudioDualFFNDecoderLayer.forward without fast-forward): text rows take
    input_layernorm + mlp, audio rows audio_input_layernorm + audio_mlp; computed here for every row and chosen by
    torch.where. Outputs and LoRA gradients agree with the routed layer."""
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config(audio_adapter_type="dual_ffn"))
    layer = model.layers[0]
    assert layer.dual_ffn
    for name in ("gate_proj", "up_proj", "down_proj"):
        for mlp in (layer.mlp, layer.audio_mlp):
            setattr(mlp, name, LoRALinear(getattr(mlp, name), r=4, alpha=8))
            getattr(mlp, name).lora_B.weight.data.normal_(0, 0.1)
    B, L, H = 2, 10, model.config.hidden_size
    x = torch.randn(B, L, H)
    audio = torch.zeros(B, L, dtype=torch.bool)
    audio[0, 2:6], audio[1, 5:] = True, True
    cos, sin = torch.ones(L, model.config.head_dim), torch.zeros(L, model.config.head_dim)

    def run(direct: bool):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        if direct:
            m = audio[..., None]
            h = torch.where(m, layer.audio_input_layernorm(xi), layer.input_layernorm(xi))
            y = xi + layer.self_attn(h, cos, sin, None)
            out = y + torch.where(m, layer.audio_mlp(layer.audio_post_attention_layernorm(y)),
                                  layer.mlp(layer.post_attention_layernorm(y)))
        else:
            out = layer(xi, cos, sin, None, audio.view(B, L, 1), dual_ffn_routing(audio))
        out.square().sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    (o1, gx1, g1), (o2, gx2, g2) = run(True), run(False)
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(gx1, gx2, atol=1e-5)
    # every trainable parameter (norm weights, attention, LoRA A/B of both FFNs; not the wrapped bases) gets one
    assert g1.keys() == g2.keys() and len(g1) == sum(p.requires_grad for p in layer.parameters())
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-5, atol=1e-6), n


def test_shared_input_equals_each_layer_alone():
    """q, k, v (or gate, up) reading one x: A factors stacked into one matmul vs each LoRALinear alone; with one
    layer merged, each runs alone (and the results are those of the layers, exactly)."""
    from higgs_min.lora import shared_input

    torch.manual_seed(0)
    layers = [LoRALinear(torch.nn.Linear(16, n, bias=False), r=4, alpha=8) for n in (16, 8, 8)]
    for m in layers:
        m.lora_B.weight.data.normal_(0, 0.1)
    x = torch.randn(2, 5, 16)

    def run(fn):
        for m in layers:
            m.zero_grad()
        xi = x.clone().requires_grad_(True)
        outs = fn(xi)
        sum((o * (i + 1)).square().sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [xi.grad] + [p.grad for m in layers for p in (m.lora_A.weight,
                                                                                           m.lora_B.weight)]

    alone, fused = run(lambda xi: [m(xi) for m in layers]), run(lambda xi: shared_input(layers, xi))
    for a, b in zip(alone, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layers[1].merge()
    alone, fused = run(lambda xi: [m(xi) for m in layers]), run(lambda xi: shared_input(layers, xi))
    assert all(torch.equal(a, b) for a, b in zip(alone[:4], fused[:4]))
