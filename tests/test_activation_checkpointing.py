"""--activation-checkpointing: recomputing each decoder layer in backward changes memory, not results."""
import pytest
import torch

from higgs_min.lora import apply_lora
from higgs_min.model import HiggsAudioModel
from tests.conftest import micro_config, random_batch


def _loss_and_grads(ckpt: bool, dropout: float):
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config())  # DualFFN layers 0, 2 and a fast-forward layer 1
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would hide the A gradients
    model.activation_checkpointing = ckpt
    ids, attn, codes, amask = random_batch(model.config)
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    torch.manual_seed(1)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model(ids, attn, codes, amask)
        loss = model.text_logits(h[~amask]).logsumexp(-1).mean() + model.audio_logits(h[amask]).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved[0]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_loss_and_lora_grads(dropout):
    loss0, g0, saved0 = _loss_and_grads(False, dropout)
    loss1, g1, saved1 = _loss_and_grads(True, dropout)
    assert saved1 < saved0 / 2  # the layers' activations were not kept: checkpointing did happen
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert set(g0) == set(g1) and any("audio_mlp" in n for n in g0)
    for n in g0:
        assert g0[n].abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-6, msg=n)
