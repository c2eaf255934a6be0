"""Held-out evaluation against a position-by-position hand computation; rank shards cover each sample once;
`best` follows the lowest eval loss and survives --keep-last."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from higgs_min import checkpoint
from higgs_min.chat import ChatEncoder
from higgs_min.data import IGNORE_INDEX
from higgs_min.prepare.sanitize import load_jsonl
from higgs_min.distributed import DistInfo
from higgs_min.evaluate import Evaluator, figures
from higgs_min.train.datasets import holdout
from higgs_min.lora import apply_lora
from higgs_min.model import HiggsAudioModel
from higgs_min.loop import Scorer
from tests.conftest import micro_config
from tests.helpers import conversation, make_tokenizer, write_codes, write_jsonl

ARGS = argparse.Namespace(audio_reduction="codebook_mean", text_weight=1.0, audio_weight=0.5, eval_every=0)


def _setup(tmp_path):
    cfg = micro_config()
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    apply_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    enc = ChatEncoder(make_tokenizer(tmp_path / "tok.json", special_base=60), cfg.audio_num_codebooks,
                      cfg.audio_codebook_size, cfg.vocab_size)
    rows = []
    for i, T in enumerate([3, 6, 2, 5, 4]):
        write_codes(tmp_path / f"codes/{i}.npy", K=4, T=T, C=16, seed=i)
        conv = conversation(f"codes/{i}.npy")
        conv["messages"][2]["content"][0]["text"] = " ".join(["hello", "world", "a", "b", "c"][:i + 1])
        rows.append(conv)
    samples, _ = load_jsonl(write_jsonl(tmp_path / "eval.jsonl", rows), enc, 4096)
    return Scorer(model, text_chunk=3), samples, enc.ids["end_of_text"]


@torch.no_grad()
def _by_hand(model, samples):
    """Each sample alone, all logits materialized, every position checked against the label one to its right."""
    model.eval()
    K = model.config.audio_num_codebooks
    t_sum = t_n = t_hit = 0.0
    a_sum, a_n, a_hit = [0.0] * K, [0] * K, [0] * K
    for s in samples:
        L = len(s.input_ids)
        h = model(s.input_ids[None], torch.ones(1, L, dtype=torch.long), s.audio_codes[None],
                  (s.audio_in_mask | s.audio_out_mask)[None])[0]
        text_logits = model.text_logits(h)  # (L, V)
        audio_logits = model.audio_logits(h)  # (L, K, C + 2)
        for i in range(L - 1):
            lab = int(s.text_labels[i + 1])
            if lab != IGNORE_INDEX:
                t_sum -= F.log_softmax(text_logits[i].double(), -1)[lab].item()
                t_n += 1
                t_hit += int(text_logits[i].argmax()) == lab
            if s.audio_out_mask[i]:
                for k in range(K):
                    lab = int(s.audio_labels[i + 1, k])
                    if lab != IGNORE_INDEX:
                        a_sum[k] -= F.log_softmax(audio_logits[i, k].double(), -1)[lab].item()
                        a_n[k] += 1
                        a_hit[k] += int(audio_logits[i, k].argmax()) == lab
    model.train()
    text = t_sum / t_n
    per_cb = [a_sum[k] / a_n[k] for k in range(K)]
    return {"text_loss": text, "audio_loss": sum(per_cb) / K, "loss": text + 0.5 * sum(per_cb) / K,
            "audio_loss_per_codebook": per_cb, "text_accuracy": t_hit / t_n,
            "audio_accuracy_per_codebook": [a_hit[k] / a_n[k] for k in range(K)],
            "text_targets": t_n, "audio_targets": sum(a_n)}


def test_eval_equals_a_hand_computation_and_ranks_partition_the_set(tmp_path):
    scorer, samples, pad = _setup(tmp_path)
    row = Evaluator(scorer, samples, 2, pad, DistInfo(), None, ARGS).run(step=7)
    hand = _by_hand(scorer.model, samples)
    assert row["split"] == "eval" and row["step"] == 7 and row["samples"] == 5
    assert row["text_targets"] == hand["text_targets"] and row["audio_targets"] == hand["audio_targets"]
    for key in ("loss", "text_loss", "audio_loss", "text_accuracy"):
        assert row[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    for key in ("audio_loss_per_codebook", "audio_accuracy_per_codebook"):
        assert row[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    assert scorer.training  # back in train mode
    # two ranks: each scores its own share, the sums add up to the one-rank figures
    shards = [Evaluator(scorer, samples, 3, pad, DistInfo(rank=r, world_size=2), None, ARGS).sums() for r in (0, 1)]
    two = figures(shards[0] + shards[1], 4, ARGS, 7, 5)
    for key in ("loss", "text_loss", "audio_loss", "text_accuracy"):
        assert two[key] == pytest.approx(row[key], rel=1e-6), key


def test_holdout_is_deterministic_and_disjoint():
    tr, ev = holdout(32, 0.25, seed=0)
    assert (tr, ev) == holdout(32, 0.25, seed=0) and len(ev) == 8 and not set(tr) & set(ev)
    assert sorted(tr + ev) == list(range(32)) and holdout(32, 0.25, seed=1)[1] != ev


def _fake_checkpoint(out, step, loss):
    files = {"trainer_state.json": checkpoint.json_bytes({"step": step, "eval": {"loss": loss}})}
    path = checkpoint.save(out, step, files)
    checkpoint.update_best(out, path.name, loss)


def test_best_follows_the_lowest_eval_loss_and_survives_keep_last(tmp_path):
    for step, loss in [(1, 5.0), (2, 3.0), (3, 4.0), (4, 3.5), (5, math.inf)]:
        _fake_checkpoint(tmp_path, step, loss)
        checkpoint.rotate(tmp_path, 2)
    assert checkpoint.read_pointer(tmp_path, "best") == "checkpoint-2"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    _fake_checkpoint(tmp_path, 6, 1.0)
    checkpoint.rotate(tmp_path, 2)
    assert checkpoint.read_pointer(tmp_path, "best") == "checkpoint-6"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
