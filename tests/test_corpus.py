"""Packed corpus: pack / open / verify against the JSONL path, and every bad-input and fault case."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from higgs_min.config import ModelConfig
from higgs_min.prepare.corpus import CorpusError, JsonlDataset, PackedDataset, open_dataset, verify
from higgs_min.chat import ChatEncoder
from higgs_min.prepare.sanitize import load_jsonl
from higgs_min.prepare.pack import pack
from higgs_min.train.options import DATA
from tests.helpers import conversation, make_tokenizer, write_codes, write_jsonl
from tests.reference_layout import assert_same_sample
from tests.trainutil import ROOT, env

K, C, V = 4, 16, 400


def demo_encoder():
    cfg = ModelConfig.from_preset("tiny")
    return ChatEncoder(DATA / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "demo"
    pack([DATA / "demo.jsonl"], DATA / "tokenizer.json", out, shard_lines=10, workers=1)
    return out


def small_set(tmp_path, rows=None, n=6):
    tok = make_tokenizer(tmp_path / "tok.json")
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    write_codes(tmp_path / "codes/b.npy", K, 9, C, seed=1)
    rows = rows or [conversation("codes/a.npy" if i % 2 else "codes/b.npy") for i in range(n)]
    return write_jsonl(tmp_path / "d.jsonl", rows), tok


def test_packed_samples_equal_the_jsonl_path_for_every_field(demo_corpus):
    enc = demo_encoder()
    want, _ = load_jsonl(DATA / "demo.jsonl", enc, 2048)
    ds = open_dataset(demo_corpus, enc, 2048)
    assert isinstance(ds, PackedDataset) and len(ds) == len(want) and len(ds.shards) == 4
    assert ds.lengths.dtype == np.int32 and ds.lengths.tolist() == [len(s.input_ids) for s in want]
    for i, s in enumerate(want):
        assert_same_sample(ds[i], s)
    assert ds.where(3) == f"{(DATA / 'demo.jsonl').resolve()}:4"
    jl = open_dataset(DATA / "demo.jsonl", enc, 2048)
    assert isinstance(jl, JsonlDataset) and np.array_equal(jl.lengths, ds.lengths)
    assert_same_sample(jl[5], want[5])
    # An independent reader (the safetensors library) sees the documented flat arrays.
    from safetensors.numpy import load_file
    a = load_file(str(demo_corpus / "shard-00001.safetensors"))
    p = ds.plan(10)
    t0, t1 = a["token_offsets"][:2]
    assert a["tokens"].dtype == np.int32 and a["flags"].dtype == np.uint8 and a["codes"].dtype == np.int16
    assert np.array_equal(a["tokens"][t0:t1], p.tokens) and a["line"][0] == 11 and a["codes"].shape[1] == 8
    m = json.loads((demo_corpus / "manifest.json").read_text())
    assert m["counts"]["packed"] == 32 and m["tokenizer"]["special_ids"] == enc.ids
    assert m["sources"][0]["lines"] == 32 and len(m["sources"][0]["sha256"]) == 64


def test_max_length_filters_by_the_index_and_counts(demo_corpus):
    ds = open_dataset(demo_corpus, demo_encoder(), 90)
    full = open_dataset(demo_corpus, demo_encoder(), 2048)
    keep = [i for i in range(len(full)) if full.lengths[i] <= 90]
    assert 0 < len(ds) == len(keep) < len(full)
    assert [ds[j].index for j in range(len(ds))] == [full[i].index for i in keep]
    assert f"longer than max length: {len(full) - len(keep)}" in ds.report


def test_pack_output_does_not_depend_on_workers_and_repacks_byte_identical(tmp_path):
    data, tok = small_set(tmp_path, n=23)
    outs = []
    for name, workers in (("w1", 1), ("w2", 2), ("again", 1)):
        pack([data], tok, tmp_path / name, num_codebooks=K, codebook_size=C, workers=workers, shard_lines=5)
        outs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert len(outs[0]) == 6 and outs[0] == outs[1] == outs[2]  # 5 shards + manifest
    with pytest.raises(CorpusError, match="exists and is not empty"):
        pack([data], tok, tmp_path / "w1", num_codebooks=K, codebook_size=C)
    pack([data], tok, tmp_path / "w1", num_codebooks=K, codebook_size=C, overwrite=True)
    assert not list(tmp_path.glob(".w1*"))


def test_every_bad_line_in_one_report_strict_and_skip(tmp_path):
    write_codes(tmp_path / "codes/k3.npy", 3, 5, C)
    rows = [conversation(), b'{"messages": [', conversation(), conversation("codes/nope.npy"),
            {"messages": [{"role": "robot", "content": "a"}]}, conversation("codes/k3.npy"),
            {"messages": [{"role": "user", "content": "hello"}]}] + [conversation()] * 300
    data, tok = small_set(tmp_path, rows)
    out = tmp_path / "corpus"
    with pytest.raises(CorpusError, match=r"4 of 307 lines rejected .*d\.jsonl:2\).*corpus\.rejected\.jsonl"):
        pack([data], tok, out, num_codebooks=K, codebook_size=C, shard_lines=3, workers=2)
    assert not out.exists() and not list(tmp_path.glob(".corpus*"))  # nothing published, nothing staged
    report = [json.loads(x) for x in (tmp_path / "corpus.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in report] == [
        (2, ""), (4, "messages[2].content[1].codes"), (5, "messages[0].role"), (6, "messages[2].content[1].codes")]
    assert all(r["file"] == str(data.resolve()) for r in report)
    assert "unknown role 'robot'" in report[2]["detail"] and "shape [3, 5], expected [4, T]" in report[3]["detail"]

    m = pack([data], tok, out, num_codebooks=K, codebook_size=C, shard_lines=3, skip_bad=True, max_bad_fraction=0.05)
    assert m["counts"]["packed"] == 302 and sum(m["counts"]["rejected"].values()) == 4
    assert m["counts"]["rejected"] == {r: sum(x["reason"] == r for x in report) for r in {x["reason"] for x in report}}
    assert m["counts"]["skipped"] == {"no supervised token": 1}
    enc = ChatEncoder(tok, K, C, V)
    ds = open_dataset(out, enc, 1000)
    assert len(ds) == 302 and "rejected at pack" in ds.report and "no supervised token: 1" in ds.report
    with pytest.raises(CorpusError, match=r"4 of 307 lines rejected \(1\.30%\) is more than --max-bad-fraction 0\.01"):
        pack([data], tok, tmp_path / "c2", num_codebooks=K, codebook_size=C, skip_bad=True)
    assert not (tmp_path / "c2").exists()


def test_the_jsonl_path_reports_every_bad_line_in_one_pass(tmp_path, caplog):
    rows = [conversation(), b'{"messages": [', conversation("codes/nope.npy"), conversation()]
    data, tok = small_set(tmp_path, rows)
    enc = ChatEncoder(tok, K, C, V)
    with pytest.raises(Exception, match=r"(?s)2 bad line\(s\) of 4.*d\.jsonl:2: malformed JSON.*d\.jsonl:3: "):
        JsonlDataset(data, enc, 1000)
    ds = JsonlDataset(data, enc, 1000, skip_bad=True, max_bad_fraction=0.5)
    assert len(ds) == 2 and "codes file missing: 1" in ds.report and "malformed JSON: 1" in ds.report


def test_codec_mix_is_refused(tmp_path):
    a, b = conversation(), conversation()
    a["messages"][2]["content"][1]["codec"] = "dac:0123456789abcdef"
    b["messages"][2]["content"][1]["codec"] = "hubert:fedcba9876543210"
    data, tok = small_set(tmp_path, [a, a, b])
    with pytest.raises(CorpusError, match=r"different audio tokenizers.*dac:0123456789abcdef.*hubert:fedcba"):
        pack([data], tok, tmp_path / "c", num_codebooks=K, codebook_size=C)
    assert not (tmp_path / "c").exists()
    data, tok = small_set(tmp_path, [a, a])
    m = pack([data], tok, tmp_path / "c", num_codebooks=K, codebook_size=C)
    assert m["audio"]["codec"] == "dac:0123456789abcdef"


def test_open_refuses_another_tokenizer_or_codebook_count_naming_both(tmp_path):
    data, tok = small_set(tmp_path)
    pack([data], tok, tmp_path / "c", num_codebooks=K, codebook_size=C)
    other = make_tokenizer(tmp_path / "other.json", special_base=350)
    with pytest.raises(CorpusError, match=r"packed with tokenizer sha256 .*tok\.json.*other\.json has sha256"):
        open_dataset(tmp_path / "c", ChatEncoder(other, K, C, V), 1000)
    with pytest.raises(CorpusError, match=r"packed with 4 codebooks of 16; the model has 8 codebooks of 16"):
        open_dataset(tmp_path / "c", ChatEncoder(tok, 8, C, V), 1000)


def test_damage_is_named_truncated_flipped_missing_manifest_changed_source(tmp_path):
    data, tok = small_set(tmp_path, n=12)
    enc = ChatEncoder(tok, K, C, V)
    c = tmp_path / "c"
    pack([data], tok, c, num_codebooks=K, codebook_size=C, shard_lines=4)
    assert verify(c)["shards"] == 3
    shard = c / "shard-00001.safetensors"
    good = shard.read_bytes()
    # a flipped byte in the data: opening (sizes, headers) cannot see it; verify names the shard
    flipped = bytearray(good)
    flipped[-3] ^= 0x01
    shard.write_bytes(bytes(flipped))
    open_dataset(c, enc, 1000)
    with pytest.raises(CorpusError, match=r"shard-00001\.safetensors: sha256 .* differs"):
        verify(c)
    # truncated: an error at open naming the shard
    shard.write_bytes(good[:-10])
    with pytest.raises(CorpusError, match=r"shard-00001\.safetensors: \d+ bytes, the manifest says \d+"):
        open_dataset(c, enc, 1000)
    shard.write_bytes(good)
    # the source changed after packing: the manifest's sha256 tells
    data.write_bytes(data.read_bytes().replace(b"hello world", b"world hello", 1))
    with pytest.raises(CorpusError, match=r"source .*d\.jsonl changed after packing"):
        verify(c)
    assert verify(c, check_sources=False)["samples"] == 12
    # no manifest: never a corpus
    (c / "manifest.json").unlink()
    with pytest.raises(CorpusError, match=r"no manifest\.json, so not a corpus"):
        open_dataset(c, enc, 1000)
    with pytest.raises(CorpusError, match="not a corpus"):
        verify(c)


def test_prepare_cli_pack_and_verify(tmp_path, capsys):
    from higgs_min.prepare.encode import main
    data, tok = small_set(tmp_path)
    assert main(["pack", "--data", str(data), "--tokenizer", str(tok), "--out", str(tmp_path / "c"),
                 "--num-codebooks", str(K), "--codebook-size", str(C), "--workers", "1"]) == 0
    assert main(["verify", str(tmp_path / "c")]) == 0
    assert "ok, 6 samples in 1 shards" in capsys.readouterr().out
    (tmp_path / "c" / "shard-00000.safetensors").write_bytes(b"x")
    assert main(["verify", str(tmp_path / "c")]) == 1
    assert "shard-00000.safetensors: 1 bytes" in capsys.readouterr().err


def test_sigkill_mid_pack_leaves_no_corpus_and_a_rerun_succeeds(tmp_path):
    data, tok = small_set(tmp_path, n=1000)
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "higgs_min.prepare", "pack", "--data", str(data), "--tokenizer", str(tok),
           "--out", str(out), "--num-codebooks", str(K), "--codebook-size", str(C), "--workers", "1",
           "--shard-lines", "50"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    staging = tmp_path / ".c.partial"
    deadline = time.time() + 60
    while time.time() < deadline and not (staging.exists() and len(list(staging.glob("shard-*"))) >= 2):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert staging.exists() and not out.exists()  # nothing visible that looks complete
    with pytest.raises(CorpusError, match="not a corpus"):
        open_dataset(staging, ChatEncoder(tok, K, C, V), 1000)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert rerun.returncode == 0, rerun.stdout
    assert "left by a pack that did not finish" in rerun.stdout and not staging.exists()
    assert verify(out)["samples"] == 1000


def test_audio_root_for_codes_paths(tmp_path):
    (tmp_path / "a").mkdir()
    data, tok = small_set(tmp_path / "a")
    moved = tmp_path / "elsewhere.jsonl"
    data.rename(moved)
    with pytest.raises(CorpusError, match="6 of 6 lines rejected"):
        pack([moved], tok, tmp_path / "c", num_codebooks=K, codebook_size=C)
    m = pack([moved], tok, tmp_path / "c", num_codebooks=K, codebook_size=C, audio_root=tmp_path / "a")
    assert m["counts"]["packed"] == 6
