"""One-pass verified checkpoint reads (issue #18): what read_verified / tensors_from_safetensors return equals
safetensors' own load_file; damage is refused before anything is restored; resume takes the previous checkpoint."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_min import checkpoint, manifest, train_state
from higgs_min.checkpoint import CheckpointError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randint(0, 9, (4,), generator=g),
            "c": torch.randn(2, 2, generator=g).bfloat16(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}


def test_verified_read_equals_load_file(tmp_path):
    t = _tensors()
    path = checkpoint.save(tmp_path, 3, {"x.safetensors": t, "meta.json": b'{"k": 1}\n'})
    data = manifest.read_verified(path)
    assert bytes(data["meta.json"]) == b'{"k": 1}\n'
    ours = manifest.tensors_from_safetensors(data["x.safetensors"], "x")
    theirs = load_file(str(path / "x.safetensors"))  # the reference reader
    assert set(ours) == set(theirs) == set(t)
    for k in t:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], t[k])
    # and a file written by safetensors itself (with __metadata__) reads the same
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = manifest.tensors_from_safetensors(bytearray((tmp_path / "ref.safetensors").read_bytes()), "ref")
    assert all(torch.equal(ref[k], t[k]) for k in t)


def test_bad_header_is_named(tmp_path):
    buf = bytearray(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"x":{"dtype":"F32","shape":[9],"data_offsets":[0,36]}}')
    with pytest.raises(CheckpointError, match="bad.safetensors: not a safetensors file"):
        manifest.tensors_from_safetensors(buf, "bad.safetensors")


def test_damage_is_refused_before_restore_and_the_previous_one_restores(tmp_path):
    from higgs_min.lora import apply_lora
    from higgs_min.model import HiggsAudioModel
    from tests.conftest import micro_config

    def fresh():
        torch.manual_seed(0)
        m = HiggsAudioModel(micro_config())
        apply_lora(m, r=2, alpha=4)
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)

    model, opt = fresh()
    for step in (1, 2):
        sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
        opt.step()
        opt.zero_grad()
        checkpoint.save(tmp_path, step, train_state.training_files(model, opt, {"r": 2}, {"step": step}))
        if step == 1:
            at_1 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    target = tmp_path / "checkpoint-2" / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    m2, o2 = fresh()
    before = {n: p.detach().clone() for n, p in m2.named_parameters() if p.requires_grad}
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its sha256"):
        train_state.load_training_state(tmp_path / "checkpoint-2", m2, o2)
    assert all(torch.equal(p, before[n]) for n, p in m2.named_parameters() if p.requires_grad)
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "checkpoint-1"
    assert train_state.load_training_state(tmp_path / "checkpoint-1", m2, o2) == {"step": 1}
    assert all(torch.equal(p, at_1[n]) for n, p in m2.named_parameters() if p.requires_grad)


def _count_hashes(monkeypatch) -> dict:
    """name -> how many times the checkpoint's reader read and hashed that file."""
    from higgs_min import manifest

    counts, real = {}, manifest._read_hashed

    def counting(path, *args):
        counts[path.name] = counts.get(path.name, 0) + 1
        return real(path, *args)

    monkeypatch.setattr(manifest, "_read_hashed", counting)
    return counts


def test_resume_hashes_the_chosen_checkpoint_once(tmp_path, monkeypatch):
    """The resume path (#27): rank 0 chooses with --resume auto, then loads; every file is hashed once, and a file
    changed between the two is hashed again and refused."""
    from tests.trainutil import run

    out = tmp_path / "out"
    assert run(out, "--max-steps", 2) == 0
    counts = _count_hashes(monkeypatch)
    assert run(out, "--max-steps", 3) == 0  # resumes from checkpoint-2 (--resume auto)
    names = sorted(p.name for p in (out / "checkpoint-2").iterdir() if p.name != checkpoint.MANIFEST)
    assert sorted(n for n in counts if (out / "checkpoint-2" / n).exists()) == names
    assert all(counts[n] == 1 for n in names), counts
    # a kept read stands only for the same files: flip a byte after choosing, the load hashes again and refuses
    folder = checkpoint.latest_valid(out, keep=True)
    target = folder / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x10
    target.write_bytes(bytes(data))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write (the clock ticks coarsely)
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its sha256"):
        manifest.read_verified(folder)


def test_parallel_save_manifest_equals_the_files(tmp_path, monkeypatch):
    """Files written in parallel threads, cut into blocks hashed in a pool (#27): each manifest entry is the size
    of the file on disk and the sha256 of each of its block-sized slices (blocks here of 1000 bytes: cut
    inside tensors and inside the header; an empty file has the sha256 of nothing)."""
    import hashlib
    import json

    from higgs_min import manifest

    monkeypatch.setattr(manifest, "BLOCK_BYTES", 1000)
    files = {f"t{i}.safetensors": {f"w{j}": torch.randn(64, 33 + i) for j in range(40)} for i in range(3)}
    files["meta.json"] = b'{"k": 2}\n'
    files["empty.bin"] = b""
    path = checkpoint.save(tmp_path, 1, files)
    m = json.loads((path / checkpoint.MANIFEST).read_bytes())
    assert m["format"] == 2 and m["block_bytes"] == 1000
    for name in files:
        raw = (path / name).read_bytes()
        blocks = [hashlib.sha256(raw[s:s + 1000]).hexdigest() for s in range(0, max(len(raw), 1), 1000)]
        assert m["files"][name] == {"sha256": blocks, "bytes": len(raw)}
    assert len(m["files"]["t2.safetensors"]["sha256"]) > 300
    got = manifest.tensors_from_safetensors(manifest.read_verified(path)["t2.safetensors"], "t2")
    assert all(torch.equal(got[k], files["t2.safetensors"][k]) for k in files["t2.safetensors"])
    # a byte flipped in one block of the middle is refused, by name
    target = path / "t1.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x04
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="t1.safetensors does not match its sha256"):
        manifest.read_verified(path)


def _format_1(folder, step, files):
    """A checkpoint as the code before block hashes wrote it: one sha256 per file, "format": 1."""
    import hashlib

    from higgs_min.atomic import json_bytes

    folder.mkdir()
    entries = {}
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
        entries[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (folder / checkpoint.MANIFEST).write_bytes(json_bytes({"format": 1, "step": step, "files": entries}))


def test_format_1_checkpoints_still_verify_and_load(tmp_path):
    from safetensors.torch import save as st_save

    t = {"a": torch.randn(300, 7), "b": torch.arange(10)}
    folder = tmp_path / "checkpoint-3"
    _format_1(folder, 3, {"x.safetensors": st_save(t), "meta.json": b"{}\n"})
    assert checkpoint.verify(folder)["format"] == 1
    assert checkpoint.latest_valid(tmp_path) == folder
    got = manifest.tensors_from_safetensors(manifest.read_verified(folder)["x.safetensors"], "x")
    assert all(torch.equal(got[k], t[k]) for k in t)
    data = bytearray((folder / "x.safetensors").read_bytes())
    data[-1] ^= 0x01
    (folder / "x.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="x.safetensors does not match its sha256"):
        checkpoint.verify(folder)


def test_unknown_or_malformed_manifest_is_refused_by_name(tmp_path):
    import json

    from higgs_min.atomic import json_bytes

    path = checkpoint.save(tmp_path, 1, {"f.bin": b"x" * 10})
    m = json.loads((path / checkpoint.MANIFEST).read_bytes())
    for edit, says in ((lambda m: m.update(format=3), "format 3 \\(this version reads \\(1, 2\\)\\)"),
                       (lambda m: m["files"]["f.bin"].update(sha256=m["files"]["f.bin"]["sha256"] * 2),
                        "f.bin: 10 bytes with 2 block hashes"),
                       (lambda m: m.update(block_bytes=0), "block_bytes 0")):
        bad = json.loads(json.dumps(m))
        edit(bad)
        (path / checkpoint.MANIFEST).write_bytes(json_bytes(bad))
        with pytest.raises(CheckpointError, match="unreadable manifest: " + says):
            checkpoint.verify(path)
