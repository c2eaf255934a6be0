import logging

import pytest
import torch

from higgs_min.config import ModelConfig
from higgs_min.model import HiggsAudioModel


def micro_config(**kw) -> ModelConfig:
    """Smaller than `tiny`, same structure, with one text-only layer to exercise both kinds."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                audio_num_codebooks=4, audio_codebook_size=16, audio_stream_bos_id=16,
                audio_stream_eos_id=17, audio_dual_ffn_layers=[0, 2], audio_ffn_intermediate_size=40)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture
def micro_model():
    torch.manual_seed(0)
    return HiggsAudioModel(micro_config())


def random_batch(cfg, B=2, L=24, seed=0, pad=True):
    """input_ids (B, L), attention_mask (B, L), audio codes (B, L, K), audio mask (B, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    codes = torch.randint(0, cfg.audio_num_classes, (B, L, cfg.audio_num_codebooks), generator=g)
    audio_mask = torch.zeros(B, L, dtype=torch.bool)
    audio_mask[:, L // 4: L // 2] = True
    attn = torch.ones(B, L, dtype=torch.long)
    if pad and B > 1:
        attn[1, L - 5:] = 0
    return ids, attn, codes, audio_mask


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(autouse=True)
def _drop_trainer_log_handlers():
    """train.main attaches a StreamHandler (this test's captured stderr) and a FileHandler to the "higgs_min"
    logger and leaves them after returning; a later test would then log into a closed capture stream
    ("--- Logging error ---" on its stderr). Remove whatever a test added."""
    logger = logging.getLogger("higgs_min")
    before = list(logger.handlers)
    yield
    for h in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(h)
        h.close()
