"""Hugging Face PEFT reads higgs_min adapter files as they are (runs where peft is installed,
e.g. after `make bench`; skipped otherwise)."""
import pytest
import torch

from higgs_min.lora import apply_lora, load_adapter
from higgs_min.model import HiggsAudioModel
from tests.conftest import random_batch
from tests.test_lora import _randomize_lora, _write_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_and_gives_identical_outputs(micro_model, tmp_path, rslora):
    cfg = micro_model.config
    base_sd = {k: v.clone() for k, v in micro_model.state_dict().items()}
    apply_lora(micro_model, r=4, alpha=8, rslora=rslora)
    _randomize_lora(micro_model)
    _write_adapter(micro_model, tmp_path / "ad")
    base = HiggsAudioModel(cfg)
    base.load_state_dict(base_sd)
    batch = random_batch(cfg)
    with torch.no_grad():
        plain = base(*batch)
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))(*batch)
        ours = micro_model(*batch)
    assert not torch.allclose(ours, plain)  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    # and back: a higgs_min model loads what PEFT saves
    peft_model = peft.PeftModel.from_pretrained(HiggsAudioModel(cfg), str(tmp_path / "ad"))
    peft_model.save_pretrained(str(tmp_path / "resaved"))
    again = HiggsAudioModel(cfg)
    again.load_state_dict(base_sd)
    load_adapter(again, tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(again(*batch), ours, rtol=1e-6, atol=1e-6)
