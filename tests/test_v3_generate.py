"""Higgs Audio v3 generation against the serving sampler (tests/v3_oracle.py: the wheel's sampler.py `step` and
`sample_independent`, transformers' Qwen3Model with its own cache), tiny seeded weights in the released layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from higgs_min.v3.layout import V3Encoder
from higgs_min.v3.sampler import SamplerState, V3Prompt, apply_rules, generate_v3, rows_to_codes, sample_codes
from higgs_min.v3.weights import build_v3
from tests import v3_oracle as oracle

W_AUDIO = "tied.embedding.modality_embeddings.0.embedding.weight"


def our_prompt(tokenizer, text, reference_text=None, codes=None, vocab_size=64) -> V3Prompt:
    """The generation prompt as generate/v3.py builds it: the training layout's (V3Encoder.prompt)."""
    enc = V3Encoder(tokenizer, 8, 1024, vocab_size)
    return V3Prompt.of(enc.prompt(text, None if codes is None else codes.numpy(), reference_text))


# ----------------------------------------------------------------------------- the prompt

@pytest.mark.parametrize("case", ["zero-shot", "clone", "clone without transcript"])
def test_prompt_equals_the_wheel(tmp_path, case):
    from transformers import PreTrainedTokenizerFast

    oracle.tiny_tokenizer_json(tmp_path / "tokenizer.json", 64)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    adapter = oracle.load_wheel().text_tokenizer.HiggsTokenizerAdapter(hf_tok)
    codes = torch.randint(0, 1024, (8, 6), generator=torch.Generator().manual_seed(0))  # (K, T)
    ref_codes = None if case == "zero-shot" else codes
    ref_text = "w4 w8" if case == "clone" else None
    p = our_prompt(tmp_path / "tokenizer.json", "w1 w2 w3", ref_text, ref_codes)
    rows = oracle.apply_delay_pattern(codes.T)  # (T + 7, K)
    want = adapter.build_prompt("w1 w2 w3", num_ref_tokens=0 if ref_codes is None else rows.shape[0],
                                reference_text=ref_text)
    want = torch.tensor(want)
    assert torch.equal(p.audio_mask, want == -100)
    assert torch.equal(p.input_ids[~p.audio_mask], want[want != -100])
    if ref_codes is not None:
        assert torch.equal(p.audio_codes[p.audio_mask], rows)


# ----------------------------------------------------------------------------- one step

@pytest.mark.parametrize("t,k,p", [(0.0, None, None), (1e-6, 5, 0.5), (1.0, None, None), (0.8, 30, 0.8),
                                   (1.3, 0, 0.95), (0.7, 3, None), (1.0, None, 0.3)])
def test_sampling_equals_sample_independent(t, k, p):
    """Same logits, same RNG stream: the same codes as the wheel's sample_independent."""
    w = oracle.load_wheel()
    logits = 3 * torch.randn(8, 1026, generator=torch.Generator().manual_seed(1))
    logits[2, :5] = logits[2, 5]  # ties at the top-k / top-p boundary
    for seed in range(5):
        torch.manual_seed(seed)
        want = w.sampler.sample_independent(logits, temperature=t, top_p=p, top_k=k)
        torch.manual_seed(seed)
        got = sample_codes(logits, t, k, p, None)
        assert torch.equal(got, want), (seed, got, want)


@pytest.mark.parametrize("eoc_steps", [[], [0, 3, 7], [8], [2, 11, 13], [9, 10]])
def test_rules_equal_sampler_step(eoc_steps):
    """Greedy logits scripted to put EOC in codebook 0 at the given steps (inside the window: ignored; after:
    the countdown): the rows and the stop equal the wheel's step, step by step."""
    w = oracle.load_wheel()
    g = torch.Generator().manual_seed(2)
    theirs, ours = w.sampler.HiggsSamplerState(num_codebooks=8), SamplerState(8)
    for s in range(30):
        logits = torch.randn(8, 1026, generator=g)
        if s in eoc_steps:
            logits[0, 1025] = 100.0
        want = w.sampler.step(logits, theirs, temperature=0.0)
        got = apply_rules(sample_codes(logits, 0.0, None, None), ours, 1024, 1025)
        assert torch.equal(got, want), s
        assert ours.done == theirs.generation_done, s
        if ours.done:
            break
    after = [s for s in eoc_steps if s >= 8]
    assert ours.done == bool(after) and (not after or s == after[0] + 6)


def test_rows_to_codes_equals_the_vocoders_revert():
    rows = torch.randint(0, 1026, (15, 8), generator=torch.Generator().manual_seed(3))
    want = oracle.reverse_delay_pattern(rows)  # (T, K)
    want = torch.where(want >= 1024, torch.zeros_like(want), want)  # vocoder_scheduler.decode_delayed_rows
    assert torch.equal(rows_to_codes(rows, 1024), want.T)
    assert rows_to_codes(rows[:7], 1024).shape == (8, 0)


# ----------------------------------------------------------------------------- whole rollouts

def prompt_of(folder, ref_frames: int | None):
    """(the wheel's prompt ids with -100 placeholders, the delayed reference rows or None, our V3Prompt)."""
    codes = None
    if ref_frames:
        codes = torch.randint(0, 1024, (8, ref_frames), generator=torch.Generator().manual_seed(4))
    p = our_prompt(folder / "tokenizer.json", "w5 w6 w7", "w1 w2" if codes is not None else None, codes)
    ids = torch.where(p.audio_mask, -100, p.input_ids).tolist()
    return ids, (p.audio_codes[p.audio_mask] if codes is not None else None), p


@pytest.fixture(scope="module")
def stopping(tmp_path_factory):
    """A tiny release whose greedy rollout emits EOC in codebook 0 at row 12: the fused matrix's cb0 EOC row is
    set so that its logit is 0 at the hidden states predicting rows 0 .. 11 and 1 above the best other code at
    the one predicting row 12 (those states are unchanged: the row is only read as an input once EOC is chosen).
    Returns (folder, the wheel's prompt ids, reference rows (None: zero-shot), our prompt)."""
    folder = tmp_path_factory.mktemp("v3gen") / "release"
    tensors = oracle.write_released(folder, seed=3)
    # zero-shot: a reference clip's delayed rows hold cb0's EOC, whose input embedding is the row changed here
    ids, rows, p = prompt_of(folder, None)
    theirs = oracle.OracleTTS(folder).eval()
    k = 12
    with torch.no_grad():
        base = theirs.rollout(ids, rows, k + 1, temperature=0.0)
        h = theirs.hidden(torch.cat([theirs.prefill_embeds(ids, rows), theirs.embed(base[:k])[None]], 1))[0]
        h = h[-(k + 1):]  # (k + 1, H): the states that predict rows 0 .. k
        W = tensors[W_AUDIO]
        best_other = (h @ W[:1025].T).max(-1).values  # (k + 1,) cb0's best real/BOC logit per step
        # v with h_j . v = 0 before row k and h_k . v = best + 1 at it (k + 1 <= H equations: exact)
        target = torch.zeros(k + 1, 1, dtype=torch.float64)
        target[k] = best_other[k] + 1.0
        v = torch.linalg.lstsq(h.double(), target, driver="gelsd").solution[:, 0].float()
        assert ((h @ v)[:k] < best_other[:k] - 1).all() and (h @ v)[k] > best_other[k] + 0.5
    tensors[W_AUDIO] = W.clone()
    tensors[W_AUDIO][1025] = v
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, ids, rows, p


def test_greedy_rollout_token_identical_to_the_oracle(stopping):
    folder, ids, rows, prompt = stopping
    want = oracle.OracleTTS(folder).eval().rollout(ids, rows, 40, temperature=0.0)
    assert want[12, 0] == 1025 and len(want) == 12 + 7  # the delay window, then EOC, then the 6-step countdown
    model = build_v3(folder)
    for use_cache in (True, False):
        g = generate_v3(model, prompt, max_new_tokens=40, temperature=0.0, use_cache=use_cache)
        assert torch.equal(g.rows, want) and g.stopped == "eoc"
    assert torch.equal(g.codes, rows_to_codes(want, 1024)) and g.frames == 12


def test_greedy_rollout_with_a_reference_clip(tmp_path):
    folder = tmp_path / "release"
    oracle.write_released(folder, seed=5)
    ids, rows, prompt = prompt_of(folder, 5)
    want = oracle.OracleTTS(folder).eval().rollout(ids, rows, 20, temperature=0.0)
    assert (want[:7].triu(1) == 1024).sum() == 28  # the delay window: codebooks above the step are BOC
    g = generate_v3(build_v3(folder), prompt, max_new_tokens=20, temperature=0.0)
    assert torch.equal(g.rows, want) and g.stopped == "max_new_tokens" and g.frames == 20 - 7


def test_sampled_rollout_repeats_and_follows_the_rng(stopping):
    """A seeded run repeats; another seed differs; and with torch's global RNG seeded alike, the rows equal the
    oracle's serving loop (same draws from logits equal to ~1e-6)."""
    folder, ids, rows, prompt = stopping
    model = build_v3(folder)
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=50, top_p=0.9)
    a = generate_v3(model, prompt, seed=7, **kw)
    assert torch.equal(a.rows, generate_v3(model, prompt, seed=7, **kw).rows)
    assert not torch.equal(a.rows, generate_v3(model, prompt, seed=8, **kw).rows)
    theirs = oracle.OracleTTS(folder).eval()  # built first: its init draws from the global RNG
    torch.manual_seed(11)
    want = theirs.rollout(ids, rows, 25, temperature=1.0, top_k=50, top_p=0.9)
    torch.manual_seed(11)
    assert torch.equal(generate_v3(model, prompt, seed=None, **kw).rows, want)


# ----------------------------------------------------------------------------- the CLI

def test_cli_base_weights_and_reference_codes(tmp_path, capsys):
    """`generate --base-weights V3DIR` (a released-layout folder) with a reference clip: the codes written are the
    greedy rollout's (the oracle's, as proven above), reverted to (K, T)."""
    import numpy as np

    from higgs_min.generate.cli import main

    folder = tmp_path / "release"
    oracle.write_released(folder, seed=5)
    ids, rows, prompt = prompt_of(folder, 5)
    ref = tmp_path / "ref.npy"
    np.save(ref, rows_to_codes(rows, 1024).numpy().astype(np.int16))  # the reference's delayed rows -> (K, T) codes
    want = oracle.OracleTTS(folder).eval().rollout(ids, rows, 20, temperature=0.0)
    out = tmp_path / "o" / "codes.npy"
    assert main(["--base-weights", str(folder), "--text", "w5 w6 w7", "--reference-codes", str(ref),
                 "--reference-text", "w1 w2", "--temperature", "0", "--max-new-tokens", "20",
                 "--codes-out", str(out)]) == 0
    got = np.load(out)
    assert got.dtype == np.int16 and np.array_equal(got, rows_to_codes(want, 1024).numpy())
    assert "20 steps (max_new_tokens), 20 delayed rows, 13 frames" in capsys.readouterr().out


def test_cli_v3_refuses_v2_options_and_a_tokenizer_without_specials(tmp_path, capsys):
    from higgs_min.generate.cli import main

    folder = tmp_path / "release"
    oracle.write_released(folder, seed=5)
    common = ["--base-weights", str(folder), "--text", "w1", "--codes-out", str(tmp_path / "a.npy")]
    assert main(common + ["--system", "be nice"]) == 2
    assert "--system: a v2 option" in capsys.readouterr().err
    from tokenizers import Tokenizer

    bad = tmp_path / "bad.json"
    raw = Tokenizer.from_file(str(folder / "tokenizer.json")).to_str().replace("<|tts|>", "<|nope|>")
    bad.write_text(raw)
    assert main(common + ["--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: special token <|tts|> is not in the tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "a.npy").exists()


def test_cli_adapter_of_a_v3_preset_run(tmp_path):
    """`--adapter CKPT` of a run on the v3-tiny preset: the base is rebuilt from the recorded preset and seed
    (runs.build_base's v3 branch) and the adapter applied; generation equals the trained model's own."""
    import json

    import numpy as np

    from higgs_min import lora
    from higgs_min.generate.cli import main
    from higgs_min.v3.config import V3Config
    from higgs_min.v3.model import HiggsV3Model

    oracle.tiny_tokenizer_json(tmp_path / "tokenizer.json", 64)
    torch.manual_seed(3)
    model = HiggsV3Model(V3Config.from_preset("v3-tiny"))
    lora.apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4.0)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    ckpt = tmp_path / "out" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    save_file(lora.adapter_state_dict(model), str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text(json.dumps(lora.adapter_config(model, ["q_proj", "v_proj"], 0.0, "t")))
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {
        "seed": 3, "preset": "v3-tiny", "tokenizer": str(tmp_path / "tokenizer.json"), "base_weights": None}}))
    want = generate_v3(model.eval(), our_prompt(tmp_path / "tokenizer.json", "w1 w2", vocab_size=1024),
                       max_new_tokens=12, temperature=0.0)
    out = tmp_path / "codes.npy"
    assert main(["--adapter", str(ckpt), "--text", "w1 w2", "--temperature", "0", "--max-new-tokens", "12",
                 "--no-merge", "--codes-out", str(out)]) == 0
    assert np.array_equal(np.load(out), want.codes.numpy())


def test_cli_decodes_with_the_codec_bundled_in_the_folder(tmp_path, monkeypatch):
    """A released v3 folder carries its codec (tests/audiotok_util's seeded tiny tokenizer here, under the v3
    prefix): `--out` without a decoder option writes the wav decoded by it."""
    import wave

    import numpy as np

    from higgs_min.generate.cli import main

    folder = oracle.write_released_with_codec(tmp_path / "release", tmp_path, monkeypatch)
    wav, npy = tmp_path / "o" / "a.wav", tmp_path / "o" / "a.npy"
    assert main(["--base-weights", str(folder), "--text", "w1 w2", "--temperature", "0", "--max-new-tokens", "12",
                 "--out", str(wav), "--codes-out", str(npy)]) == 0
    frames = np.load(npy).shape[1]
    with wave.open(str(wav)) as w:
        assert frames == 5 and w.getframerate() == 24000 and w.getnframes() == frames * 960
