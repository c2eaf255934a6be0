"""What fine-tuning a v3 model adds to v2's: the tied fused audio matrix trained as ONE tensor.

    train_audio_embedding(model)   --train-audio-embedding: W (K * (C + 2), H) trainable, an fp32 master copy
    check_tie(model, where)        the audio head and the audio embedding are one Parameter (after a load, a save)

The released model's audio head IS its fused audio embedding (sglang-omni 0.1.9 model.py HiggsTTSModel ties
HiggsFusedMultiTextHead.weight to HiggsFusedMultiTextEmbedding.weight). Trained as one Parameter, the served
model after training is still the trained one: PEFT's modules_to_save would copy the embedding and the head into
two tensors that drift apart. In memory both paths read `model.audio_embedding.weight` (HiggsV3Model.embed and
.audio_logits); on disk the checkpoint holds it once (lora.trained_tensors, `trained_tensors.safetensors`).
A bf16 base keeps its bf16 weights; W becomes fp32 (the master copy AdamW updates; its moments are fp32 too) and
is cast to the activations' dtype where it is used, as LoRA casts its input.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def train_audio_embedding(model) -> nn.Parameter:
    """Make the fused audio matrix trainable in fp32, in place of the frozen one (call after apply_lora, which
    freezes everything). The new Parameter replaces the old under the same module, so the embedding and the
    head, which both read it from there, stay one tensor."""
    emb = model.audio_embedding
    emb.weight = nn.Parameter(emb.weight.detach().to(torch.float32).clone(), requires_grad=True)
    check_tie(model, "--train-audio-embedding")
    log.info("--train-audio-embedding: the fused audio matrix %s (embedding = head, one fp32 tensor) is trained, "
             "%s parameters", tuple(emb.weight.shape), f"{emb.weight.numel():,}")
    return emb.weight


def check_tie(model, where: str) -> None:
    """The fused audio matrix is one Parameter: no other parameter of the model holds a copy of its shape
    (a head copy, as PEFT's modules_to_save makes, would be one). Raises ValueError naming `where`."""
    w = model.audio_embedding.weight
    copies = [n for n, p in model.named_parameters(remove_duplicate=False) if p.shape == w.shape and p is not w]
    if copies:
        raise ValueError(f"{where}: the audio head must be the audio embedding (one tensor), but {copies} hold a "
                         f"separate {tuple(w.shape)} matrix")
