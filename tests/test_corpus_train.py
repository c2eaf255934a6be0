"""Training from a packed corpus: the sampler in numpy, DataLoader workers, resume, and the trainer end to end."""
import random
import shutil

import numpy as np
import pytest
import torch

from higgs_min.batches import BatchStream, distributed_order, length_grouped, padding_fraction
from higgs_min.config import ModelConfig
from higgs_min.prepare.corpus import open_dataset
from higgs_min.chat import ChatEncoder
from higgs_min.prepare.pack import pack
from higgs_min.train.options import DATA
from tests.trainutil import adapter, metrics, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "demo"
    pack([DATA / "demo.jsonl"], DATA / "tokenizer.json", out, shard_lines=10, workers=1)
    return out


@pytest.fixture(scope="module")
def packed(corpus):
    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(DATA / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    return open_dataset(corpus, enc, 2048)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_is_distributed_samplers_order_and_ranks_are_disjoint():
    from torch.utils.data import DistributedSampler
    for n, world in [(32, 1), (32, 2), (31, 3), (5, 4)]:
        for epoch in (0, 3):
            orders = [distributed_order(n, world, r, seed=7, epoch=epoch) for r in range(world)]
            for r in range(world):
                ref = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=7)
                ref.set_epoch(epoch)
                assert orders[r].tolist() == list(ref)
            every = np.concatenate(orders)
            assert set(every.tolist()) == set(range(n))  # all covered
            assert len(every) - len(set(every.tolist())) == len(every) - n  # repeats: only the sampler's padding


def test_length_grouping_in_numpy_equals_the_list_formulation():
    def reference(order, lengths, b, seed):  # the list-based version this replaced
        rng = random.Random(seed)
        mega = b * 50
        groups = [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
        batches = [g[i:i + b] for g in groups for i in range(0, len(g), b)]
        rng.shuffle(batches)
        return [j for x in batches for j in x]
    rng = np.random.default_rng(0)
    for n, b in [(1000, 8), (37, 4), (3, 8)]:
        lengths = rng.integers(10, 400, n)
        order = rng.permutation(n)
        assert length_grouped(order, lengths, b, 5).tolist() == reference(order.tolist(), lengths.tolist(), b, 5)


def test_packed_batches_one_vs_two_ranks_grouping_workers_and_resume(packed):
    one = BatchStream(packed, 8, 1, 0, seed=3, pad_id=0)
    ranks = [BatchStream(packed, 4, 2, r, seed=3, pad_id=0) for r in range(2)]
    for _ in range(2 * one.batches_per_epoch()):  # across an epoch boundary
        want = sorted(one.next()["sample_index"].tolist())
        assert sorted(sum((r.next()["sample_index"].tolist() for r in ranks), [])) == want
    for group in (False, True):
        plain = BatchStream(packed, 4, 1, 0, seed=1, pad_id=0, group_by_length=group)
        two = BatchStream(packed, 4, 1, 0, seed=1, pad_id=0, group_by_length=group, workers=2)
        try:
            for i in range(13):  # 8 batches an epoch: crosses one boundary
                a, b = plain.next(), two.next()
                assert _same(a, b), (group, i)
            assert (plain.epoch, plain.position) == (two.epoch, two.position) == (1, 5)
            # a resumed stream (cursor set, workers prefetching) continues with the same batches
            back = BatchStream(packed, 4, 1, 0, seed=1, pad_id=0, group_by_length=group, workers=2)
            back.epoch, back.position = two.epoch, two.position
            for _ in range(6):
                assert _same(back.next(), plain.next())
            back.close()
        finally:
            two.close()
    grouped = BatchStream(packed, 4, 1, 0, seed=0, pad_id=0, group_by_length=True)
    order = grouped.epoch_order(0)
    assert sorted(order.tolist()) == list(range(len(packed)))
    assert padding_fraction(packed.lengths, order, 4) < padding_fraction(
        packed.lengths, BatchStream(packed, 4, 1, 0, seed=0, pad_id=0).epoch_order(0), 4)


def test_training_on_the_packed_demo_equals_training_on_the_jsonl(tmp_path, corpus):
    assert run(tmp_path / "jsonl", "--data", DATA / "demo.jsonl", "--group-by-length", "--max-steps", 3) == 0
    assert run(tmp_path / "packed", "--data", corpus, "--group-by-length", "--max-steps", 3) == 0
    assert metrics(tmp_path / "jsonl") == [dict(m, elapsed_s=j["elapsed_s"], tokens_per_s=j["tokens_per_s"])
                                           for m, j in zip(metrics(tmp_path / "packed"), metrics(tmp_path / "jsonl"))]
    assert len(metrics(tmp_path / "jsonl")) == 3
    assert _same(adapter(tmp_path / "jsonl" / "checkpoint-3"), adapter(tmp_path / "packed" / "checkpoint-3"))


def test_mid_epoch_resume_from_a_packed_corpus_with_workers_is_bitwise(tmp_path, corpus):
    # 32 samples at batch 6: 6 batches an epoch; stop at step 4 (mid-epoch), finish at 7 (next epoch).
    common = ["--data", corpus, "--max-steps", 7, "--lora-dropout", 0.1, "--batch-size", 6]
    assert run(tmp_path / "full", *common) == 0
    assert run(tmp_path / "part", *common, "--save-steps", 4, "--data-workers", 2) == 0
    shutil.rmtree(tmp_path / "part" / "checkpoint-7")
    assert run(tmp_path / "part", *common, "--data-workers", 2) == 0
    assert _same(adapter(tmp_path / "full" / "checkpoint-7"), adapter(tmp_path / "part" / "checkpoint-7"))


def _damaged(tmp_path, corpus):
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    shard = bad / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    return bad


def test_a_damaged_shard_stops_the_run_before_any_of_its_samples_is_used(tmp_path, corpus, caplog, monkeypatch):
    """#27: start-up reads the manifest, sizes and headers only; the shard is hashed before its first sample is
    built, and the run stops with one line naming it. Every sample built is recorded: none from that shard."""
    from higgs_min.prepare import corpus as corpus_mod

    bad = _damaged(tmp_path, corpus)
    damaged_lines = set(corpus_mod.Shard(bad / "shard-00002.safetensors", (bad / "shard-00002.safetensors").stat()
                                         .st_size, 10, 8).array("line").tolist())
    built, real = [], corpus_mod.materialize
    monkeypatch.setattr(corpus_mod, "materialize", lambda plan, *a: built.append(plan.index) or real(plan, *a))
    assert run(tmp_path / "out", "--data", bad, "--max-steps", 8) == 1  # 8 x 4 samples: the whole epoch
    assert any("shard-00002.safetensors: sha256" in r.message for r in caplog.records)
    assert not damaged_lines & set(built)
    caplog.clear()  # with DataLoader workers: checked in the sampler, so the same one line (no worker traceback)
    assert run(tmp_path / "out2", "--data", bad, "--max-steps", 8, "--data-workers", 2) == 1
    errors = [r.message for r in caplog.records if "shard-00002" in r.message]
    assert errors and all("sha256" in m and "Traceback" not in m and "worker" not in m for m in errors), errors
    built.clear()  # the recorder's control: unchecked, the epoch does build the damaged shard's samples
    assert run(tmp_path / "out3", "--data", bad, "--no-verify-data", "--max-steps", 8) == 0
    assert damaged_lines & set(built)
