"""export writes a complete base folder: `--base-weights merged/` trains, and merged logits == base + adapter."""
import json

import torch

from higgs_min.config import ModelConfig
from higgs_min.export.merge import INDEX, main as export_main, released_config
from higgs_min.model import HiggsAudioModel
from higgs_min.weights import load_pretrained
from higgs_min.train.runs import build_base, load_trained
from tests.conftest import micro_config, random_batch
from tests.helpers import make_tokenizer
from tests.trainutil import run


def test_released_config_round_trips(tmp_path):
    for cfg in (micro_config(audio_ffn_intermediate_size=48),
                micro_config(audio_ffn_intermediate_size=48, audio_adapter_type="dual_ffn", audio_embed_avg=True),
                ModelConfig.from_preset("higgs-v2-3b")):
        (tmp_path / "config.json").write_text(json.dumps(released_config(cfg)))
        assert ModelConfig.from_pretrained_config(tmp_path) == cfg


def test_export_of_a_preset_run_is_a_base_folder_that_trains(tmp_path, caplog, capsys):
    assert run(tmp_path / "run", "--max-steps", 2, "--lr", "1e-2") == 0
    ck, merged = tmp_path / "run" / "checkpoint-2", tmp_path / "merged"
    assert export_main(["--adapter", str(ck), "--out", str(merged)]) == 0
    assert {"config.json", "tokenizer.json", "model.safetensors", INDEX} <= {p.name for p in merged.iterdir()}

    trained = load_trained(ck)
    cfg = ModelConfig.from_pretrained_config(merged)
    assert cfg == trained.cfg
    with torch.device("meta"):
        base = HiggsAudioModel(cfg)
    load_pretrained(base, merged)
    batch = random_batch(cfg, B=2, L=24)
    with torch.no_grad():
        h_merged, h_lora = base(*batch), trained.model(*batch)
        assert not torch.allclose(build_base("tiny", None, 0)[0](*batch), h_merged)  # the adapter did something
        # W + scale·B@A folded in fp32 vs applied on the side: equal to 1e-5 of the logits' scale
        for ours, ref in ((base.text_logits(h_merged), trained.model.text_logits(h_lora)),
                          (base.audio_logits(h_merged), trained.model.audio_logits(h_lora))):
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()

    # the merged folder trains, with its own tokenizer by default
    assert run(tmp_path / "run2", "--max-steps", 1, "--base-weights", merged) == 0
    recorded = json.loads((tmp_path / "run2" / "run_config.json").read_text())["train"]
    assert recorded["tokenizer"] == str(merged / "tokenizer.json")

    # a tokenizer larger than the model's vocabulary is refused, naming both sizes
    big = make_tokenizer(tmp_path / "big.json", special_base=2000)
    capsys.readouterr()
    assert run(tmp_path / "run3", "--max-steps", 1, "--base-weights", merged, "--tokenizer", big) == 1
    err = capsys.readouterr().err
    assert "has 2010 tokens" in err and "1024" in err
    assert export_main(["--adapter", str(ck), "--out", str(tmp_path / "m2"), "--tokenizer", str(big)]) == 1
    err = capsys.readouterr().err
    assert "2010 tokens" in err and "1024" in err and not (tmp_path / "m2").exists()


def test_export_accepts_what_generate_accepts_for_adapter(tmp_path, capsys):
    """--adapter RUN_DIR (the run's newest valid checkpoint), OUT/best-style pointers and a checkpoint folder,
    as generate --adapter (train/runs.py:find_adapter); anything else is one line naming the path."""
    assert run(tmp_path / "run", "--max-steps", 2, "--save-steps", 1) == 0
    newest = (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert newest != (tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    for i, given in enumerate((tmp_path / "run", tmp_path / "run" / "latest", tmp_path / "run" / "checkpoint-2")):
        assert export_main(["--adapter", str(given), "--adapter-only", "--out", str(tmp_path / f"a{i}")]) == 0
        assert (tmp_path / f"a{i}" / "adapter_model.safetensors").read_bytes() == newest
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert export_main(["--adapter", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "--adapter " + str(tmp_path / "empty") + ": neither a checkpoint" in capsys.readouterr().err
