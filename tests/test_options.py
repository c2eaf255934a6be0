"""The released config's layout/model options (issue #18): <|eom_id|>, audio_embed_avg, fast-forward layers,
use_delay_pattern false, and the options refused at config load. Each against a direct formulation."""
import json
import math

import numpy as np
import pytest
import torch

from higgs_min.config import REFUSED_FIELDS, ModelConfig
from higgs_min.chat import EOM, ChatEncoder
from higgs_min.data import IGNORE_INDEX, StreamRule
from higgs_min.schema import DataError
from higgs_min.prepare.sanitize import load_jsonl
from higgs_min.model import HiggsAudioModel, rotate_half
from tests.conftest import micro_config, random_batch
from tests.helpers import make_tokenizer, write_codes, write_jsonl

K, C, V = 4, 16, 400


def _tokenizer_with_eom(path):
    from tokenizers import AddedToken, Tokenizer
    make_tokenizer(path)
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken(EOM, special=True)])
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------------- <|eom_id|>

def test_eom_closes_an_assistant_message_followed_by_another(tmp_path):
    enc = ChatEncoder(_tokenizer_with_eom(tmp_path / "tok.json"), K, C, V)
    eom, eot = enc.eom, enc.ids["eot"]
    write_codes(tmp_path / "codes/a.npy", K, 3, C)
    msgs = [{"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the cat"},
            {"role": "assistant", "content": [{"type": "audio", "codes": "codes/a.npy"}]},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (s,), _ = load_jsonl(tmp_path / "d.jsonl", enc, 1000)
    ids, lab = s.input_ids.tolist(), s.text_labels.tolist()
    # Direct formulation of official prepare_chatml_sample: message i's closing token is eom iff it is an
    # assistant message and message i+1 exists and is an assistant message; closers sit right before the
    # next header (or at the end).
    closers = [i - 1 for i, t in enumerate(ids) if t == enc.ids["start_header"]][1:] + [len(ids) - 1]
    want = [eom if m["role"] == "assistant" and i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant" else eot
            for i, m in enumerate(msgs)]
    assert [ids[i] for i in closers] == want == [eot, eom, eom, eot, eot, eot]
    # labels: an assistant's closer (eom or eot) is a target, a user's is not
    assert [lab[i] for i in closers] == [IGNORE_INDEX, eom, eom, eot, IGNORE_INDEX, eot]
    assert ids.count(eom) == 2


def test_eom_needed_but_missing_from_the_tokenizer_is_named(tmp_path):
    enc = ChatEncoder(make_tokenizer(tmp_path / "tok.json"), K, C, V)
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    two = {"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}
    write_jsonl(tmp_path / "ok.jsonl", [ok])
    assert load_jsonl(tmp_path / "ok.jsonl", enc, 1000)[1].loaded == 1
    write_jsonl(tmp_path / "two.jsonl", [two])
    with pytest.raises(DataError, match=r"two\.jsonl:1: messages\[0\]: .*<\|eom_id\|>"):
        load_jsonl(tmp_path / "two.jsonl", enc, 1000)


# ----------------------------------------------------------------------------------------- no delay pattern

def test_no_delay_layout(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.json")
    codes = write_codes(tmp_path / "codes/a.npy", K, 5, C).astype(np.int64)
    user = write_codes(tmp_path / "codes/u.npy", K, 3, C, seed=1).astype(np.int64)
    from tests.helpers import conversation
    write_jsonl(tmp_path / "d.jsonl", [conversation("codes/a.npy", user_audio="codes/u.npy")])
    (d,), _ = load_jsonl(tmp_path / "d.jsonl", ChatEncoder(tok, K, C, V), 1000)
    enc = ChatEncoder(tok, K, C, V, delay=False)
    (s,), _ = load_jsonl(tmp_path / "d.jsonl", enc, 1000)
    # Official collator without use_delay_pattern: [BOS | codes | EOS], labels [-100 | codes | EOS], T + 2 columns.
    for mask, c, supervised in ((s.audio_out_mask, codes, True), (s.audio_in_mask, user, False)):
        pos = mask.nonzero().squeeze(1)
        T = c.shape[1]
        assert len(pos) == T + 2 and torch.equal(pos, torch.arange(pos[0], pos[0] + T + 2))
        for j, p in enumerate(pos.tolist()):
            want = [C] * K if j == 0 else ([C + 1] * K if j == T + 1 else c[:, j - 1].tolist())
            assert s.audio_codes[p].tolist() == want
            wl = [IGNORE_INDEX] * K if j == 0 or not supervised else want
            assert s.audio_labels[p].tolist() == wl
    # Everything else as with the delay, K - 1 positions shorter per stream.
    assert len(d.input_ids) - len(s.input_ids) == 2 * (K - 1)
    keep = ~(d.audio_in_mask | d.audio_out_mask)
    keep_s = ~(s.audio_in_mask | s.audio_out_mask)
    assert torch.equal(d.input_ids[keep], s.input_ids[keep_s])
    assert torch.equal(d.text_labels[keep], s.text_labels[keep_s])
    plan = enc.plan(json.loads((tmp_path / "d.jsonl").read_text())["messages"],
                    lambda item, w: np.load(tmp_path / item["codes"]), "x", 1)
    assert plan.length(enc.streams) == len(s.input_ids) and plan.length(StreamRule(K, C)) == len(d.input_ids)


# ------------------------------------------------------------------------------------------ audio_embed_avg

@pytest.mark.parametrize("avg", [False, True])
def test_audio_embed_avg(avg):
    torch.manual_seed(0)
    m = HiggsAudioModel(micro_config(audio_embed_avg=avg))
    codes = torch.tensor([[[3, 0, 17, 5], [1, 2, 3, 4]]])  # (1, 2, K)
    x = m.embed(torch.tensor([[1, 2]]), codes, torch.tensor([[True, False]]))
    E, C2 = m.audio_codebook_embeddings.weight, m.config.audio_num_classes
    rows = [E[3], E[C2 + 0], E[2 * C2 + 17], E[3 * C2 + 5]]
    total = rows[0] + rows[1] + rows[2] + rows[3]
    torch.testing.assert_close(x[0, 0], total / 4 if avg else total)
    assert torch.equal(x[0, 1], m.embed_tokens.weight[2])


# ------------------------------------------------------------------------------------- fast-forward layers

def _direct_llama_layer(layer, x_rows, pos, cfg):
    """A Llama layer on one sequence of rows (n, H) at RoPE positions pos (n,), causal among them, written
    out with an explicit softmax (no SDPA, no masks)."""
    att = layer.self_attn
    nh, nkv, hd = att.nh, att.nkv, att.hd
    h = layer.input_layernorm(x_rows)
    n = len(pos)
    q = att.q_proj(h).view(n, nh, hd).transpose(0, 1)
    k = att.k_proj(h).view(n, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    v = att.v_proj(h).view(n, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    from higgs_min.model import rope_inv_freq
    f = torch.outer(pos.float(), rope_inv_freq(cfg))
    emb = torch.cat((f, f), -1)
    cos, sin = emb.cos(), emb.sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * hd)
    x_rows = x_rows + att.o_proj(y)
    return x_rows + layer.mlp(layer.post_attention_layernorm(x_rows))


def test_fast_forward_layer_against_direct_formulation():
    """INVARIANT of a fast-forward layer (official HiggsAudioDualFFNDecoderLayer(fast_forward=True)): audio rows
    come out exactly as they went in; each text row comes out as a plain Llama layer run on its sequence with
    the audio (and padding) positions removed, at their original RoPE positions."""
    torch.manual_seed(0)
    cfg = micro_config()  # layers [0, 2] DualFFN, layer 1 fast-forward (the default adapter type)
    model = HiggsAudioModel(cfg)
    layer = model.layers[1]
    assert layer.fast_forward and not layer.dual_ffn and not hasattr(layer, "audio_mlp")
    ids, attn, codes, amask = random_batch(cfg, B=2, L=24)
    amask[1, 2:5] = True  # two audio spans in row 1, so text sits between audio
    captured = {}
    layer.register_forward_hook(lambda mod, args, out: captured.update(x=args[0].detach(), y=out.detach()))
    model(ids, attn, codes, amask)
    x, y = captured["x"], captured["y"]
    assert torch.equal(y[amask], x[amask])
    for b in range(2):
        keep = (~amask[b] & attn[b].bool()).nonzero().squeeze(1)
        with torch.no_grad():
            want = _direct_llama_layer(layer, x[b, keep], keep, cfg)
        torch.testing.assert_close(y[b, keep], want, rtol=1e-5, atol=1e-5)


def test_fast_forward_mask_equals_the_official_one_on_text_rows():
    """Official (modeling_higgs_audio.py, HiggsAudioDualFFNDecoderLayer.forward, 4-D mask branch):
    attention_mask.masked_fill(audio[query] | audio[key], min) on the causal+padding mask. Ours is the same on
    every text query row; audio query rows (discarded by the layer) keep only their diagonal."""
    g = torch.Generator().manual_seed(1)
    B, L = 3, 17
    audio = torch.rand(B, L, generator=g) < 0.4
    audio[:, 0] = False
    attn = torch.ones(B, L, dtype=torch.long)
    attn[2, 12:] = 0
    min_v = torch.finfo(torch.float32).min
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    base = torch.where(causal[None, None] & attn.bool()[:, None, None, :], 0.0, min_v)  # HF additive form
    official = base.masked_fill(audio.view(B, 1, L, 1) | audio.view(B, 1, 1, L), min_v) == 0  # True = attend
    ours = HiggsAudioModel.fast_forward_mask(audio, attn)
    text_q = ~audio
    assert torch.equal(ours[:, 0][text_q], official[:, 0][text_q])
    assert torch.equal(ours[:, 0][audio], torch.eye(L, dtype=torch.bool).expand(B, L, L)[audio])


def test_fast_forward_vs_dual_ffn_adapter_and_gradients():
    torch.manual_seed(0)
    ff = HiggsAudioModel(micro_config())
    plain = HiggsAudioModel(micro_config(audio_adapter_type="dual_ffn"))
    plain.load_state_dict(ff.state_dict())  # same tensors: the adapter type only changes routing
    ids, attn, codes, amask = random_batch(ff.config)
    h_ff, h_plain = ff(ids, attn, codes, amask), plain(ids, attn, codes, amask)
    first_audio = amask[0].nonzero()[0].item()
    torch.testing.assert_close(h_ff[0, :first_audio], h_plain[0, :first_audio], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(h_ff[amask], h_plain[amask])
    # without audio the two adapters are the same model
    assert torch.equal(ff(ids, attn), plain(ids, attn))
    h_ff.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ff.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- refusals

def _released(**over):
    raw = {
        "audio_adapter_type": "dual_ffn_fast_forward", "audio_embed_avg": False, "use_delay_pattern": True,
        "audio_num_codebooks": 8, "audio_codebook_size": 1024, "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025, "audio_dual_ffn_layers": list(range(28)), "skip_audio_tower": True,
        "encode_whisper_embed": False, "encode_audio_in_tokens": True, "use_audio_out_embed_projector": False,
        "use_audio_out_self_attention": 0, "audio_decoder_proj_num_layers": 0, "use_rq_transformer": False,
        "audio_ffn_hidden_size": 3072, "audio_ffn_intermediate_size": 8192,
        "text_config": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                        "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    }
    raw.update(over)
    return raw


def test_released_options_are_read(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_released(audio_embed_avg=True, use_delay_pattern=False, audio_adapter_type="dual_ffn")))
    cfg = ModelConfig.from_pretrained_config(p)
    assert cfg.audio_embed_avg and not cfg.use_delay_pattern and cfg.audio_adapter_type == "dual_ffn"


@pytest.mark.parametrize("field,value", [("audio_adapter_type", "stack"), ("audio_ffn_intermediate_size", 4096)]
                         + [(name, "other") for name, _, _ in REFUSED_FIELDS])
def test_unsupported_options_are_refused_by_name(tmp_path, field, value):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_released(**{field: value})))
    with pytest.raises(ValueError, match=rf"config\.json: {field}='?{value}'? "):
        ModelConfig.from_pretrained_config(p)
    with pytest.raises(ValueError, match="audio_adapter_type='stack'"):
        ModelConfig(audio_adapter_type="stack").validate()
