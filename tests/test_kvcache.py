"""KV cache invariant: prefill + steps, and any chunking, equal the full forward (hidden states, both heads)."""
import pytest
import torch

from higgs_min.model import HiggsAudioModel, KVCache
from tests.conftest import micro_config


def mixed_sequence(cfg, seed=0):
    """text(5), audio-in(6), text(4), audio-out(7), text(3): ids (1, 25), codes (1, 25, K), audio mask (1, 25)."""
    g = torch.Generator().manual_seed(seed)
    kinds = [0] * 5 + [1] * 6 + [0] * 4 + [1] * 7 + [0] * 3
    L = len(kinds)
    ids = torch.randint(0, cfg.vocab_size, (1, L), generator=g)
    codes = torch.randint(0, cfg.audio_num_classes, (1, L, cfg.audio_num_codebooks), generator=g)
    amask = torch.tensor(kinds, dtype=torch.bool)[None]
    return ids, codes, amask


def heads(model, h):
    rows = h.reshape(-1, h.shape[-1])
    return model.text_logits(rows), model.audio_logits(rows)


def run_chunked(model, ids, codes, amask, sizes):
    cache = KVCache(model.config, max_len=ids.shape[1] + 3)
    outs, p = [], 0
    for n in sizes:
        outs.append(model(ids[:, p:p + n], None, codes[:, p:p + n], amask[:, p:p + n], cache=cache))
        p += n
    assert p == ids.shape[1] and cache.length == p
    return torch.cat(outs, 1)


@pytest.mark.parametrize("sizes", [
    [25],  # one prefill
    [10] + [1] * 15,  # prefill then one position per step
    [1] * 25,  # every step alone
    [3, 7, 1, 9, 5],  # chunks cutting audio segments in the middle
    [8, 8, 8, 1],
])
def test_cached_equals_full_forward(sizes):
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config()).eval()
    ids, codes, amask = mixed_sequence(model.config)
    with torch.no_grad():
        full = model(ids, None, codes, amask)
        got = run_chunked(model, ids, codes, amask, sizes)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
        for a, b in zip(heads(model, got), heads(model, full)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cache_refuses_padding_and_overflow():
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config()).eval()
    ids, codes, amask = mixed_sequence(model.config)
    cache = KVCache(model.config, max_len=10)
    attn = torch.ones_like(ids)
    attn[0, -1] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids[:, :5], attn[:, -5:], codes[:, :5], amask[:, :5], cache=cache)
    with pytest.raises(ValueError, match="10 positions; 0 used \\+ 25 new"):
        model(ids, None, codes, amask, cache=cache)


def test_wrong_mask_alignment_would_be_caught():
    """The invariant test can fail: a top-left aligned causal mask on a chunk differs from the full forward."""
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config()).eval()
    ids, codes, amask = mixed_sequence(model.config)
    import torch.nn.functional as F
    real = F.scaled_dot_product_attention

    def top_left(q, k, v, attn_mask=None, is_causal=False, **kw):
        if attn_mask is not None and attn_mask.shape[-1] != attn_mask.shape[-2]:
            attn_mask, is_causal = None, True  # the classic mistake
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    with torch.no_grad():
        full = model(ids, None, codes, amask)
        F.scaled_dot_product_attention = top_left
        try:
            bad = run_chunked(model, ids, codes, amask, [10, 15])
        finally:
            F.scaled_dot_product_attention = real
    assert (bad[:, 10:] - full[:, 10:]).abs().max() > 1e-3
