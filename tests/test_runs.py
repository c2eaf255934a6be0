"""runs.load_trained rebuilds the trained model: base from the recorded preset and seed, adapter from the files."""
import json

import pytest
import torch

from higgs_min.config import ModelConfig
from higgs_min.lora import lora_layers
from higgs_min.model import HiggsAudioModel
from higgs_min.errors import RunError
from higgs_min.train.runs import load_trained
from tests.trainutil import adapter, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run(out, "--max-steps", "2", "--seed", "3") == 0
    return out / "checkpoint-2"


def test_preset_run_rebuilds_base_and_adapter(trained):
    t = load_trained(trained)
    # independent: the preset's random init drawn directly with the recorded seed
    torch.manual_seed(3)
    fresh = HiggsAudioModel(ModelConfig.from_preset("tiny")).state_dict()
    layers = lora_layers(t.model)
    for name, tensor in t.model.state_dict().items():
        if ".lora_" in name:
            continue
        base_name = name.replace(".base.", ".")
        assert torch.equal(tensor, fresh[base_name]), name
    files = adapter(trained)
    assert len(files) == 2 * len(layers) > 0
    for path, m in layers.items():
        assert torch.equal(m.lora_A.weight, files[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(m.lora_B.weight, files[f"base_model.model.{path}.lora_B.weight"])
    assert t.settings["seed"] == 3 and t.tokenizer is not None and t.tokenizer.exists()
    assert any(m.lora_B.weight.abs().sum() > 0 for m in layers.values())  # it did train


def test_errors_name_the_problem(trained, tmp_path):
    with pytest.raises(RunError, match="no adapter_config.json"):
        load_trained(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / f).write_bytes((trained / f).read_bytes())
    with pytest.raises(RunError, match="pass --base-weights"):
        load_trained(bare)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in trained.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    state = json.loads((moved / "trainer_state.json").read_text())
    state["config"]["base_weights"] = str(tmp_path / "gone")
    (moved / "trainer_state.json").write_text(json.dumps(state))
    (moved / "manifest.json").unlink()  # hand-edited: no longer a verified checkpoint, still an adapter folder
    with pytest.raises(RunError, match="do not exist here"):
        load_trained(moved)
