"""One-off check (not part of `make test`: about a minute and 3 GB): at the RELEASED shape, random
weights (fan-in scaled, so the codes are diverse), our codes equal transformers' HiggsAudioV2TokenizerModel.

    PYTHONPATH=. .venv/bin/python tests/check_released_shape_parity.py [seconds]
"""
import sys

import torch

from higgs_min.audio import tokenizer as at
from higgs_min.audio import tokenizer_files as tf
from tests import audiotok_util as u

RELEASED = {"n_filters": 32, "D": 256, "codebook_dim": 64, "target_bandwidths": [0.5, 1, 1.5, 2, 4],
            "ratios": [8, 5, 4, 2, 3], "sample_rate": 24000, "bins": 1024, "n_q": 8,
            "semantic_techer": "hubert_base_general"}  # bosonai/higgs-audio-v2-tokenizer config.json


def main(seconds: float = 2.0) -> int:
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel
    _, model = u.tiny_model(0, RELEASED)
    state = u.released_state(model)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(tf.check_and_filter(tf.fold_weight_norm(state), expected, "released-shape", 8))
    cfg = HiggsAudioV2TokenizerConfig(
        acoustic_model_config=dict(encoder_hidden_size=64, downsampling_ratios=RELEASED["ratios"],
                                   decoder_hidden_size=1024, upsampling_ratios=RELEASED["ratios"], hidden_size=256),
        target_bandwidths=[2])  # 8 quantizers, as n_q
    with torch.device("meta"):
        ref = HiggsAudioV2TokenizerModel(cfg)
    missing, unexpected = ref.load_state_dict(u.to_transformers(state), strict=False, assign=True)
    assert not unexpected and all(k.startswith(("decoder_semantic.", "fc1.")) for k in missing), (missing, unexpected)
    n = int(seconds * 24000) // 960 * 960
    x = 0.3 * torch.sin(torch.arange(n) * 0.05) + 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = ref.eval().encode(x[None, None], return_dict=False)[0]
    got = at.AudioTokenizer(model, "released-shape").encode(x)
    same = torch.equal(got, expect)
    print(f"released shape, {n / 24000:.2f} s: codes {tuple(got.shape)}, equal to transformers: {same}; "
          f"distinct codes per codebook {[len(set(r.tolist())) for r in got]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*map(float, sys.argv[1:])))
