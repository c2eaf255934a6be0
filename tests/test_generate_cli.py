"""The generate CLI: base rebuilt from a run's preset + seed, adapter applied, a wav (demo DAC) and codes written."""
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from higgs_min import lora
from higgs_min.config import ModelConfig
from higgs_min.generate.cli import load_model, main
from higgs_min.model import HiggsAudioModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer.json"


def fake_run(tmp_path: Path, seed=3) -> tuple[Path, HiggsAudioModel]:
    """A checkpoint as the trainer leaves it for the tiny preset (recorded options + a non-trivial adapter)."""
    torch.manual_seed(seed)
    model = HiggsAudioModel(ModelConfig.from_preset("tiny"))
    targets = ["q_proj", "v_proj", "mlp.up_proj"]
    lora.apply_lora(model, targets, r=2, alpha=4.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    ckpt = tmp_path / "out" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    save_file(lora.adapter_state_dict(model), str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text(json.dumps(lora.adapter_config(model, targets, 0.0, "test")))
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"config": {"seed": seed, "preset": "tiny", "tokenizer": str(TOKENIZER), "base_weights": None}}))
    return ckpt, model.eval()


def test_merged_adapter_computes_the_trained_model(tmp_path):
    ckpt, trained = fake_run(tmp_path)
    merged, tok = load_model(ckpt, None, torch.device("cpu"), torch.float32, merge=True)
    assert tok == TOKENIZER and all(m.merged for m in lora.lora_layers(merged).values())
    kept, _ = load_model(ckpt, None, torch.device("cpu"), torch.float32, merge=False)
    ids = torch.randint(0, 705, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids)
        torch.testing.assert_close(kept(ids), want, rtol=0, atol=0)  # same base bits, same adapter
        torch.testing.assert_close(merged(ids), want, rtol=1e-5, atol=1e-5)
        assert (merged(ids) - HiggsAudioModel(ModelConfig.from_preset("tiny"))(ids)).abs().max() > 1e-3


def test_cli_writes_wav_and_codes_demo_dac(tmp_path):
    pytest.importorskip("dac")
    ckpt, _ = fake_run(tmp_path)
    wav, npy = tmp_path / "o" / "out.wav", tmp_path / "o" / "out.npy"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "higgs_min.generate", "--adapter", str(ckpt),
                        "--random-codec-seed", "0", "--text", "hello world", "--force-audio",
                        "--max-new-tokens", "20", "--seed", "0", "--out", str(wav), "--codes-out", str(npy)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = np.load(npy)
    assert codes.dtype == np.int16 and codes.shape[0] == 8 and codes.shape[1] >= 1
    assert 0 <= codes.min() and codes.max() < 1024
    with wave.open(str(wav)) as w:
        # DAC output is the frames times the hop, give or take its convolutions' edges.
        assert w.getframerate() == 24000 and abs(w.getnframes() - codes.shape[1] * 960) < 960
    assert "real-time factor" in r.stdout and f"[8, {codes.shape[1]}]" in r.stdout
    assert sorted(p.name for p in wav.parent.iterdir()) == ["out.npy", "out.wav"]  # no temporary left


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    ckpt, _ = fake_run(tmp_path)
    assert main(["--adapter", str(ckpt), "--text", "x", "--out", str(tmp_path / "a.wav")]) == 2
    err = capsys.readouterr().err
    assert "no decoder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--adapter", str(ckpt), "--text", "x", "--reference-text", "y", "--codes-out", "a.npy"]) == 2
    assert "voice cloning needs --reference-text together with" in capsys.readouterr().err
    assert main(["--adapter", str(ckpt), "--text", "x", "--reference-audio", "missing.wav", "--reference-text", "y",
                 "--random-codec-seed", "0", "--codes-out", "a.npy"]) == 2
    assert "--reference-audio missing.wav: no such file" in capsys.readouterr().err
    assert main(["--adapter", str(ckpt), "--text", "x", "--reference-codes", "missing.npy", "--reference-text", "y",
                 "--codes-out", str(tmp_path / "a.npy")]) == 2
    assert "--reference-codes missing.npy: no such file" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), dtype=np.int64))  # a file of the wrong shape names the flag
    assert main(["--adapter", str(ckpt), "--text", "x", "--reference-codes", str(tmp_path / "bad.npy"),
                 "--reference-text", "y", "--codes-out", str(tmp_path / "a.npy")]) != 0
    err = capsys.readouterr().err
    assert "--reference-codes: " in err and ".codes:" not in err, err
    assert main(["--adapter", str(tmp_path / "nope"), "--text", "x", "--codes-out", str(tmp_path / "a.npy")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert main(["--adapter", str(tmp_path / "best"), "--text", "x", "--codes-out", str(tmp_path / "a.npy")]) == 2
    assert "OUT/best" not in capsys.readouterr().err  # not a run's folder (a typo?): no hint about best
    (tmp_path / "latest").write_text(ckpt.name + "\n")  # a run's folder, never evaluated: it has no best
    assert main(["--adapter", str(tmp_path / "best"), "--text", "x", "--codes-out", str(tmp_path / "a.npy")]) == 2
    assert "OUT/best exists once a run evaluates" in capsys.readouterr().err
    (ckpt / "trainer_state.json").unlink()  # a bare adapter: its base is unknown
    assert main(["--adapter", str(ckpt), "--text", "x", "--codes-out", str(tmp_path / "a.npy")]) == 1
    assert "pass --base-weights" in capsys.readouterr().err
    assert not (tmp_path / "a.npy").exists()


def test_cli_generates_past_a_padded_vocabulary_id(tmp_path, capsys, monkeypatch):
    """The tiny model's vocabulary (1024) exceeds the tokenizer's 705 ids. The sampler is forced to pick 904, then
    904 again, then <|eot_id|>: generation ends by its stop id, the text decode skips the two ids (the official
    behaviour), exit 0."""
    from higgs_min.generate import sampling
    from tokenizers import Tokenizer

    ckpt, _ = fake_run(tmp_path)
    eot = Tokenizer.from_file(str(TOKENIZER)).token_to_id("<|eot_id|>")
    script, real = [904, 904, eot], sampling.choose

    def forced(scores, greedy, gen):
        if scores.shape[-1] == 1024:  # text head (the audio head has 1026 columns)
            return torch.tensor([script.pop(0)])
        return real(scores, greedy, gen)

    monkeypatch.setattr(sampling, "choose", forced)
    out = tmp_path / "g.npy"
    assert main(["--adapter", str(ckpt), "--text", "hi", "--codes-out", str(out), "--max-new-tokens", "10"]) == 0
    o = capsys.readouterr()
    assert "Traceback" not in o.err and not script
    assert "text: '<|eot_id|>'" in o.out and "3 steps (stop id)" in o.out
    assert np.load(out).shape == (8, 0)
