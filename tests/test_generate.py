"""Generation: the official delay-pattern rules on hand-made logits, RAS, warpers, cache parity, seeds."""
import pytest
import torch
import torch.nn as nn

from higgs_min.data import audio_stream
from higgs_min.generate.sampling import (DelayState, GenerationError, Prompt, delay_rules, generate, repetition_aware,
                                segment_codes, warp)
from higgs_min.model import HiggsAudioModel
from tests.conftest import micro_config

K, C = 4, 16
B, E = 16, 17  # stream BOS, EOS
SP = {"audio_out_bos": 90, "audio_out": 91, "audio_eos": 92, "eot": 93, "end_of_text": 94, "begin_of_text": 95}
W1, W2 = 5, 6  # ordinary words


class ScriptedModel(nn.Module):
    """Heads return one-hot logits from scripts, consumed in order; every forward's input is recorded."""

    def __init__(self, text_script, audio_script):
        super().__init__()
        self.config = micro_config()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.text_script, self.audio_script = list(text_script), list(audio_script)
        self.fed = []  # (ids, codes, audio_mask) per forward

    def forward(self, ids, attn=None, codes=None, amask=None, cache=None):
        self.fed.append((ids[0].tolist(), codes[0].tolist(), amask[0].tolist()))
        if cache is not None:
            cache.length += ids.shape[1]
        return torch.zeros(1, ids.shape[1], 1)

    def text_logits(self, h):
        out = torch.zeros(1, self.config.vocab_size)
        out[0, self.text_script.pop(0)] = 10.0
        return out

    def audio_logits(self, h):
        out = torch.zeros(1, K, C + 2)
        out[0, torch.arange(K), torch.tensor(self.audio_script.pop(0))] = 10.0
        return out


def prompt(force_audio, prompt_audio_out=None):
    ids = [SP["begin_of_text"], W1, W2] + ([SP["audio_out_bos"]] if force_audio else [])
    codes = torch.zeros(len(ids), K, dtype=torch.long)
    out = torch.zeros(len(ids), dtype=torch.bool)
    if prompt_audio_out is not None:  # (K, n) columns at audio-out positions before the tail
        n = prompt_audio_out.shape[1]
        ids = ids[:1] + [SP["audio_out"]] * n + ids[1:]
        codes = torch.cat([codes[:1], prompt_audio_out.T, codes[1:]])
        out = torch.cat([out[:1], torch.ones(n, dtype=torch.bool), out[1:]])
    return Prompt(torch.tensor(ids), codes, out.clone(), out, SP)


def greedy(model, p, n=50, **kw):
    return generate(model, p, max_new_tokens=n, temperature=0, ras_win_len=0, **kw)


def col(*v):
    return torch.tensor(v)


def test_bos_forcing_and_eos_from_codebook_0():
    m = ScriptedModel([SP["eot"]], [[1, 2, 3, 4], [5, 6, 7, 8], [E, 9, 10, 11], [1, 2, 3, 4], [1, 2, 3, 4],
                                    [1, 2, 3, 4]])
    g = greedy(m, prompt(force_audio=True))
    want = torch.stack([col(B, B, B, B), col(1, B, B, B), col(5, 6, B, B), col(E, 9, 10, B),
                        col(E, 2, 3, 4), col(E, E, 3, 4), col(E, E, E, 4)], 1)
    assert len(g.audio) == 1 and torch.equal(g.audio[0], want)
    assert g.text_ids == [SP["audio_out"], SP["audio_eos"], SP["eot"]]
    assert (g.steps, g.stopped) == (8, "stop id")
    # Reverted by hand: row k reads columns k..k+3; BOS/EOS clip to C-1; first and last frame dropped.
    assert torch.equal(g.codes, torch.tensor([[1, 5], [6, 9], [10, 3], [4, 4]]))
    # The prompt once, then every column but the last fed as one audio-out position, then <|audio_eos|>.
    assert len(m.fed) == 8
    for j in range(6):
        ids, codes, amask = m.fed[1 + j]
        assert ids == [SP["audio_out"]] and codes == [want[:, j].tolist()] and amask == [True]
    assert m.fed[7][0] == [SP["audio_eos"]] and m.fed[7][2] == [False]


def test_eos_from_a_middle_codebook_is_the_first_eos():
    # EOS at codebooks 2 and 3: the official takes the FIRST (2): codebooks < 2 forced, one more column.
    m = ScriptedModel([SP["eot"]], [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [7, 8, E, E], [1, 2, 3, 4]])
    g = greedy(m, prompt(True))
    assert torch.equal(g.audio[0][:, 4], col(E, E, E, E))
    assert torch.equal(g.audio[0][:, 5], col(E, E, E, 4))
    assert g.audio[0].shape == (K, 6) and g.text_ids[-2:] == [SP["audio_eos"], SP["eot"]]


def test_eos_from_the_last_codebook_ends_at_once():
    m = ScriptedModel([SP["eot"]], [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, E]])
    g = greedy(m, prompt(True))
    assert g.audio[0].shape == (K, 5) and torch.equal(g.audio[0][:, 4], col(E, E, E, E))
    assert g.text_ids == [SP["audio_out"], SP["audio_eos"], SP["eot"]]


def test_eos_under_the_bos_delay_is_overwritten():
    # Column 1 forces codebooks >= 1 to BOS before looking for EOS: an EOS sampled there does not count.
    m = ScriptedModel([], [[1, E, E, E]] + [[1, 2, 3, 4]] * 10)
    g = greedy(m, prompt(True), n=6)
    assert torch.equal(g.audio[0][:, 1], col(1, B, B, B)) and g.stopped == "max_new_tokens"


def test_cut_by_max_new_tokens():
    m = ScriptedModel([], [[1, 2, 3, 4]] * 10)
    g = greedy(m, prompt(True), n=3)
    assert g.audio[0].shape == (K, 3) and g.codes.shape == (K, 0)  # fewer than K columns: empty, no crash
    assert (g.steps, g.stopped, g.text_ids) == (3, "max_new_tokens", [SP["audio_out"]])
    m = ScriptedModel([], [[1, 2, 3, 4]] * 10)
    g = greedy(m, prompt(True), n=7)  # 7 columns, no EOS: revert gives 4 frames, minus first and last
    assert g.codes.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]


def test_several_segments_from_text_mode():
    seg = [[1, 2, 3, 4], [5, 6, 7, 8], [E, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    text = [W1, SP["audio_out_bos"], W2, SP["audio_out_bos"], SP["eot"]]
    m = ScriptedModel(text, seg + seg)
    g = greedy(m, prompt(False))
    a = [SP["audio_out_bos"], SP["audio_out"], SP["audio_eos"]]
    assert g.text_ids == [W1] + a + [W2] + a + [SP["eot"]]
    assert len(g.audio) == 2 and torch.equal(g.audio[0], g.audio[1])
    one = segment_codes(g.audio[0], C)
    assert one.shape == (K, 2) and torch.equal(g.codes, torch.cat([one, one], 1))
    assert g.steps == len(g.text_ids) + 2 * (7 - 2)  # every step counts: 5 silent audio steps per segment


def test_audio_out_in_text_mode_is_a_clear_error():
    m = ScriptedModel([W1, SP["audio_out"]], [])
    with pytest.raises(GenerationError, match=r"step 2: the model sampled <\|AUDIO_OUT\|> in text mode"):
        greedy(m, prompt(False))


def test_padded_vocabulary_id_is_kept_and_fed_back():
    """vocab 97 > a 96-token tokenizer: id 96 is sampled, kept in the stream, fed back, and generation goes on."""
    m = ScriptedModel([W1, 96, W2, SP["eot"]], [])
    p = prompt(False)
    p.vocab_size = 96
    g = greedy(m, p)
    assert g.text_ids == [W1, 96, W2, SP["eot"]] and g.stopped == "stop id"
    assert [f[0] for f in m.fed[1:]] == [[W1], [96], [W2]]  # the padded id is the next step's input


def test_custom_stop_ids():
    m = ScriptedModel([W1, W2, SP["eot"]], [])
    g = greedy(m, prompt(False), stop_ids=[W2])
    assert g.text_ids == [W1, W2] and g.stopped == "stop id"


def test_revert_is_the_inverse_of_the_training_delay():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 9):
        codes = torch.randint(0, C, (K, T), generator=g)
        delayed, _ = audio_stream(codes, bos=B, eos=E)  # the training layout: delay([BOS | codes | EOS])
        assert torch.equal(segment_codes(delayed, C), codes)


def test_delay_rules_state_resets_after_a_segment():
    s = DelayState()
    for c in ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]):
        delay_rules(torch.tensor(c), s, B, E)
    out, ended = delay_rules(torch.tensor([1, 2, 3, E]), s, B, E)
    assert ended and (s.num_delay, s.remaining) == (0, None)


def test_ras_resamples_exactly_the_repeating_rows():
    hist = torch.tensor([[3, 9, 9, 9, 3, 0, 3, 5],  # row 0: candidate 3 twice in the last 7 -> resample
                         [7, 7, 1, 2, 4, 5, 6, 0],  # row 1: 7 twice, but only once in the last 7
                         [8, 0, 8, 1, 8, 2, 8, 8],  # row 2: 8 five times in the last 7 -> resample
                         [1, 2, 3, 4, 5, 6, 7, 0]])  # row 3: candidate 4 once
    tokens = torch.tensor([3, 7, 8, 4])
    raw = torch.zeros(4, C + 2)
    calls = []

    def fake(rows):
        calls.append(rows.clone())
        return torch.full((rows.shape[0],), 100)

    out = repetition_aware(tokens, hist, raw + torch.arange(4.)[:, None], 7, 2, fake)
    assert out.tolist() == [100, 7, 100, 4] and tokens.tolist() == [3, 7, 8, 4]
    assert len(calls) == 1 and calls[0][:, 0].tolist() == [0.0, 2.0]  # rows 0 and 2, raw logits
    assert repetition_aware(tokens, hist, raw, 7, 3, fake).tolist() == [3, 7, 100, 4]
    assert repetition_aware(tokens, hist, raw, 0, 2, fake).tolist() == [3, 7, 8, 4]  # off


def test_ras_history_includes_the_prompt_audio_out(monkeypatch):
    # The official window reads audio_out_ids: the prompt's audio-out streams (voice cloning), then this segment.
    import higgs_min.generate.sampling as G
    seen, real = [], G.repetition_aware

    def spy(tokens, history, raw, win, rep, resample):
        seen.append((history.clone(), win, rep))
        return real(tokens, history, raw, win, rep, resample)

    monkeypatch.setattr(G, "repetition_aware", spy)
    p = prompt(True, prompt_audio_out=torch.tensor([[3, 4], [0, 5], [0, 6], [0, 7]]))
    generate(ScriptedModel([], [[3, 2, 2, 2]]), p, max_new_tokens=2, temperature=0, ras_win_len=7, ras_max_repeat=2)
    assert len(seen) == 1
    assert seen[0][0].tolist() == [[3, 4, B], [0, 5, B], [0, 6, B], [0, 7, B]] and seen[0][1:] == (7, 2)


def test_warp_matches_transformers_warpers():
    tr = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 50, generator=g) * 3
    x[0, :5] = 2.0  # ties at the k-th value
    for t, k, p in [(0.3, 50, 0.95), (1.0, 5, 0.5), (0.7, None, 0.9), (1.3, 3, None), (0.5, 200, 0.99)]:
        want = TemperatureLogitsWarper(t)(None, x) if t != 1.0 else x
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p is not None:
            want = TopPLogitsWarper(p)(None, want)
        assert torch.equal(warp(x, t, k, p), want), (t, k, p)
    assert tr is not None


def random_prompt(cfg, force_audio=True):
    ids = torch.tensor([1, 2, 3, 4, 5, 6] + ([SP["audio_out_bos"]] if force_audio else []))
    L = len(ids)
    return Prompt(ids, torch.zeros(L, cfg.audio_num_codebooks, dtype=torch.long), torch.zeros(L, dtype=torch.bool),
                  torch.zeros(L, dtype=torch.bool), SP)


def test_seeded_sampling_repeats_and_cache_matches_full_reforward():
    torch.manual_seed(0)
    model = HiggsAudioModel(micro_config(vocab_size=1000, audio_codebook_size=128, audio_stream_bos_id=128,
                                         audio_adapter_type="dual_ffn",  # the random model this test was tuned on
                                         audio_stream_eos_id=129))
    p = random_prompt(model.config)
    # A random model may end a segment; then any text token but the audio ones ends the run.
    stop = [i for i in range(1000) if i not in (SP["audio_out_bos"], SP["audio_out"])]
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=8, top_p=0.9, stop_ids=stop)
    a = generate(model, p, seed=7, **kw)
    b = generate(model, p, seed=7, **kw)
    c = generate(model, p, seed=8, **kw)
    assert torch.equal(torch.cat(a.audio, 1), torch.cat(b.audio, 1)) and a.text_ids == b.text_ids
    assert not torch.equal(torch.cat(a.audio, 1), torch.cat(c.audio, 1))
    d = generate(model, p, seed=7, use_cache=False, **kw)
    assert torch.equal(torch.cat(a.audio, 1), torch.cat(d.audio, 1)) and a.text_ids == d.text_ids
    e = generate(model, p, max_new_tokens=40, temperature=0, ras_win_len=0, stop_ids=stop)
    f = generate(model, p, max_new_tokens=40, temperature=0, ras_win_len=0, stop_ids=stop, use_cache=False)
    assert torch.equal(torch.cat(e.audio, 1), torch.cat(f.audio, 1)) and e.text_ids == f.text_ids
    assert a.stopped == "stop id" and e.steps == 40  # a segment ended, and a long one ran


def test_overfit_one_demo_sample_regenerates_it_greedily():
    """Fit one demo conversation; from its prompt, greedy generation (cached and not) gives back its
    answer text, <|audio_out_bos|>, the audio segment and <|eot_id|>, and its codes exactly."""
    import json
    from pathlib import Path

    import numpy as np
    import torch.nn.functional as F

    from higgs_min.chat import ChatEncoder
    from higgs_min.data import IGNORE_INDEX, next_token_targets
    from higgs_min.generate.sampling import make_prompt

    root = Path(__file__).resolve().parents[1] / "data"
    cfg = micro_config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                       audio_num_codebooks=8, audio_codebook_size=1024, audio_stream_bos_id=1024,
                       audio_stream_eos_id=1025, audio_dual_ffn_layers=[0, 1], audio_ffn_intermediate_size=128)
    enc = ChatEncoder(root / "tokenizer.json", 8, 1024, cfg.vocab_size)
    rows = [json.loads(line) for line in (root / "demo.jsonl").read_text().splitlines()]
    msgs = min((r["messages"] for r in rows if isinstance(r["messages"][1]["content"], str)),
               key=lambda m: len(json.dumps(m)))
    codes_of = lambda item, where: torch.from_numpy(np.load(root / item["codes"]).astype("int64"))  # noqa: E731
    s = enc.encode(msgs, codes_of, "demo", 1)
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    amask = (s.audio_in_mask | s.audio_out_mask)[None]
    tt, at = next_token_targets(s.text_labels[None])[0], next_token_targets(s.audio_labels[None])[0]
    ts, arows = tt != IGNORE_INDEX, (at != IGNORE_INDEX).any(-1)
    for _ in range(60):  # exact from about step 25 on
        h = model(s.input_ids[None], None, s.audio_codes[None], amask)[0]
        loss = F.cross_entropy(model.text_logits(h[ts]), tt[ts]) + F.cross_entropy(
            model.audio_logits(h[arows]).flatten(0, 1), at[arows].flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompt = make_prompt(enc, msgs[:-1])
    want_codes = codes_of(msgs[-1]["content"][1], "")
    answer = s.input_ids[len(prompt.input_ids):]  # text, <|audio_out_bos|>, <|AUDIO_OUT|> x S, <|audio_eos|>, <|eot_id|>
    want_text = [t for i, t in enumerate(answer.tolist()) if i == 0 or not (t == answer[i - 1] == enc.ids["audio_out"])]
    for use_cache in (True, False):
        g = generate(model, prompt, max_new_tokens=400, temperature=0, ras_win_len=0, use_cache=use_cache)
        assert g.text_ids == want_text, (loss.item(), enc.decode(g.text_ids))
        assert torch.equal(g.codes, want_codes)
        assert torch.equal(g.audio[0], s.audio_codes[s.audio_out_mask].T)


def test_a_model_without_the_delay_pattern_is_refused():
    m = ScriptedModel([W1], [])
    m.config.use_delay_pattern = False
    with pytest.raises(GenerationError, match="use_delay_pattern"):
        greedy(m, prompt(False))
    assert m.fed == []  # refused before any forward
