"""The sample figures: WER/CER against jiwer (an independent implementation) on 1,000 seeded pairs, the
normalization on a table of cases (and against transformers' copy of Whisper's normalizer), silence, and the
ASR and speaker paths on tiny random transformers models saved to folders."""
import json
import random
import sys

import pytest
import torch

from higgs_min.errors import UsageError
from higgs_min.train import audio_metrics as am


def _pairs(n=1000, seed=0):
    """Seeded (reference, hypothesis) pairs: the hypothesis is the reference with random word edits."""
    rng = random.Random(seed)
    words = ["a", "the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "b", "c"]
    out = []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 10))]
        hyp = list(ref)
        for _ in range(rng.randint(0, 4)):
            op = rng.choice("sdi")
            j = rng.randrange(len(hyp) + (op == "i")) if hyp or op == "i" else 0
            if op == "s" and hyp:
                hyp[j] = rng.choice(words)
            elif op == "d" and hyp:
                del hyp[j]
            elif op == "i":
                hyp.insert(j, rng.choice(words))
        out.append((" ".join(ref), " ".join(hyp)))
    return out


def test_wer_and_cer_equal_jiwer_on_1000_seeded_pairs():
    jiwer = pytest.importorskip("jiwer", reason="jiwer (requirements-test.txt) is the independent implementation")
    pairs = _pairs()
    assert sum(r == h for r, h in pairs) < 400  # most pairs differ
    totals = {"word_edits": 0, "words": 0, "char_edits": 0, "chars": 0}
    for ref, hyp in pairs:
        c = am.error_counts(ref, hyp)  # already normalized text: normalize is the identity here
        assert am.error_rate(c["word_edits"], c["words"]) == pytest.approx(jiwer.wer(ref, hyp), abs=1e-12), (ref, hyp)
        assert am.error_rate(c["char_edits"], c["chars"]) == pytest.approx(jiwer.cer(ref, hyp), abs=1e-12), (ref, hyp)
        for k in totals:
            totals[k] += c[k]
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    # the corpus rate: Σ edits / Σ reference length, as jiwer computes it over lists
    assert totals["word_edits"] / totals["words"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert totals["char_edits"] / totals["chars"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


def test_edit_distance_small_cases():
    assert am.edit_distance("kitten", "sitting") == 3
    assert am.edit_distance([], ["a", "b"]) == 2
    assert am.edit_distance(["a", "b"], []) == 2
    assert am.error_rate(3, 0) is None  # an empty reference is not scored


NORMALIZATION = [
    ("Hello, World!", "hello world"),
    ("  many   spaces\tand\nlines ", "many spaces and lines"),
    ("don't stop", "don t stop"),
    ("[noise] yes <unk> (laughs) no", "yes no"),
    ("The year 2024 — it's 3:15.", "the year 2024 it s 3 15"),
    ("Ünïcödé café", "ünïcödé café"),  # NFKC keeps composed letters; diacritics are not removed
    ("ﬁne", "fine"),  # NFKC splits the ligature
    ("عاصمة مصر هي القاهرة.", "عاصمة مصر هي القاهرة"),
    ("", ""),
    ("?!...", ""),
]


@pytest.mark.parametrize("text,expected", NORMALIZATION)
def test_normalization_table(text, expected):
    assert am.normalize(text) == expected


def test_normalization_equals_transformers_whisper_basic_normalizer():
    mod = pytest.importorskip("transformers.models.whisper.english_normalizer")
    theirs = mod.BasicTextNormalizer()
    for text, _ in NORMALIZATION + [(r, "") for r, _ in _pairs(50)]:
        assert am.normalize(text) == theirs(text).strip(), text


def test_silence_fraction():
    rate = 16000
    assert am.silence_fraction(torch.zeros(rate), rate) == 1.0
    tone = 0.5 * torch.sin(torch.arange(rate) / rate * 2 * torch.pi * 440)
    assert am.silence_fraction(tone, rate) == 0.0
    assert am.silence_fraction(torch.cat([tone, torch.zeros(rate)]), rate) == pytest.approx(0.5)
    # -40 dBFS is the line: a constant 0.02 (-34 dBFS) is sound, 0.005 (-46 dBFS) is silence
    assert am.silence_fraction(torch.full((rate,), 0.02), rate) == 0.0
    assert am.silence_fraction(torch.full((rate,), 0.005), rate) == 1.0


# ----------------------------------------------------------------------------- tiny transformers models

def save_tiny_whisper(folder):
    """A random 1-layer Whisper with a character vocabulary, saved with its processor (as a real checkpoint)."""
    tf = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "'"]
    vocab = {c: i for i, c in enumerate(chars)}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = tf.WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                              bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    eos, start = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = tf.WhisperConfig(vocab_size=len(vocab), num_mel_bins=16, encoder_layers=1, decoder_layers=1, d_model=16,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_target_positions=64, decoder_start_token_id=start,
                           eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(cfg)
    model.generation_config = tf.GenerationConfig(decoder_start_token_id=start, eos_token_id=eos, pad_token_id=eos,
                                                  no_timestamps_token_id=vocab["<|notimestamps|>"])
    model.save_pretrained(folder)
    tf.WhisperProcessor(tf.WhisperFeatureExtractor(feature_size=16), tok).save_pretrained(folder)
    return folder


def save_tiny_xvector(folder):
    """A random 1-layer WavLMForXVector (8-dim embeddings) with its feature extractor."""
    tf = pytest.importorskip("transformers")
    cfg = tf.WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1),
                         xvector_output_dim=8, num_buckets=32, max_bucket_distance=64)
    torch.manual_seed(0)
    tf.WavLMForXVector(cfg).save_pretrained(folder)
    tf.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                return_attention_mask=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("listeners")
    return save_tiny_whisper(root / "whisper"), save_tiny_xvector(root / "xvector")


def test_asr_and_speaker_plumbing_on_tiny_models(tiny_models):
    whisper, xvector = tiny_models
    asr, speaker = am.Asr(whisper, max_new_tokens=6), am.Speaker(xvector)
    g = torch.Generator().manual_seed(0)
    clip = 0.1 * torch.randn(24000, generator=g)  # 1 s at 24 kHz: resampled to 16 kHz inside
    heard = asr.transcribe(clip, 24000)
    assert isinstance(heard, str) and heard == asr.transcribe(clip, 24000)  # greedy: the same words twice
    c = am.error_counts("the cat", heard)
    assert c["words"] == 2 and c["word_edits"] >= 0
    e = speaker.embed(clip, 24000)
    assert e.shape == (8,) and e.dtype == torch.float32
    assert speaker.similarity(e, speaker.embed(clip, 24000)) == pytest.approx(1.0, abs=1e-6)  # a clip with itself
    other = speaker.embed(0.1 * torch.randn(24000, generator=g), 24000)
    assert -1.0 <= speaker.similarity(e, other) <= 1.0


def test_model_folders_are_checked_and_a_missing_transformers_is_one_line(tmp_path, monkeypatch, tiny_models):
    with pytest.raises(UsageError, match="--eval-asr .*config.json"):
        am.Asr(tmp_path / "nothing")
    with pytest.raises(UsageError, match="--eval-speaker .*not a loadable"):
        am.Speaker(tiny_models[0])  # a Whisper folder is not an x-vector model
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UsageError, match="needs the transformers package"):
        am.Asr(tiny_models[0])
