"""What higgs_min writes in transformers' HiggsAudioV2 format loads there as it is and computes the same thing.

The independent formulation is transformers' own HiggsAudioV2ForConditionalGeneration (and PEFT on top of
it): a merged export must give the logits of higgs_min's base + unmerged adapter, and so must our adapter
loaded by PEFT onto transformers' base. Skipped where transformers / peft are not installed.

A seeded 2-layer model, DualFFN in every layer, llama3 RoPE, LoRA on every linear including both heads:
transformers loads the export with no missing, unexpected or mismatched keys, and its text and audio logits on
a padded batch mixing text, audio-in and audio-out (with delay ids) equal higgs_min's base + unmerged adapter
to 1e-4 in fp32 and 1e-5 in fp64 (measured: 2.3e-6 in fp32, 7.5e-7 in fp64, on logits up to 4.3; the two
compute the RoPE frequencies in different precisions); the adapter-only export through
peft.PeftModel.from_pretrained onto transformers' base gives the same; the CLI exports a preset run and a run
trained on a transformers-format base; transformers' greedy generate() runs on the export.
"""
import copy
import dataclasses
import json

import pytest
import torch

from higgs_min import weights
from higgs_min.config import ROPE_KEYS, transformers_config_kwargs
from higgs_min.export import transformers_format as tf
from higgs_min.config import ModelConfig
from higgs_min.export.merge import main as export_main
from higgs_min.lora import DEFAULT_TARGETS, adapter_config, adapter_state_dict, apply_lora, merge_lora
from higgs_min.model import HiggsAudioModel
from higgs_min.weights import load_pretrained
from tests.helpers import conversation, make_tokenizer, write_codes, write_jsonl
from tests.test_lora import _randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Prefixed patterns on purpose: they must be renamed for transformers' tree (and suffixes must not be).
TARGETS = DEFAULT_TARGETS + ["audio_decoder_proj.audio_lm_head", "text_lm_head"]


def tiny_config(**kw) -> ModelConfig:
    """DualFFN in every layer, llama3 RoPE (the released scaling), K=4 codebooks of 16."""
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, audio_num_codebooks=4, audio_codebook_size=16,
                audio_stream_bos_id=16, audio_stream_eos_id=17, audio_dual_ffn_layers=[0, 1],
                audio_ffn_intermediate_size=96, initializer_range=0.1)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def base_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}


def write_hf(model, folder, tokenizer, dtype=torch.float32):
    tokenizer_json, ids = tf.export_tokenizer(tokenizer, model.config.vocab_size)
    config = tf.to_transformers_config(model.config, ids, dtype)
    return tf.write_model_folder(folder, base_state(model), config, tokenizer_json, shard_bytes=60_000), ids


def load_hf(folder, **kw):
    model, info = transformers.HiggsAudioV2ForConditionalGeneration.from_pretrained(
        str(folder), use_text_head=True, output_loading_info=True, **kw)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected, mismatched keys, no errors
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A seeded tiny base + a random LoRA on every linear; its merged export, base export and adapter."""
    d = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer(d / "tokenizer.json")
    torch.manual_seed(0)
    model = HiggsAudioModel(tiny_config()).eval()
    base_copy = copy.deepcopy(model)
    apply_lora(model, TARGETS, r=4, alpha=8)
    _randomize_lora(model)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    _, ids = write_hf(merged, d / "merged", tok)
    write_hf(base_copy, d / "base", tok)
    adapter_cfg = adapter_config(model, TARGETS, 0.0, "tiny")
    linears = [n for n, m in base_copy.named_modules() if isinstance(m, torch.nn.Linear)]
    tf.write_adapter_folder(d / "adapter", *tf.adapter_to_transformers(adapter_cfg, adapter_state_dict(model), linears))
    return {"dir": d, "tok": tok, "model": model, "ids": ids, "base": base_copy}


def mixed_batch(cfg, ids, seed=0):
    """Two right-padded rows holding text, an audio-in span and an audio-out span: our inputs and transformers'."""
    g = torch.Generator().manual_seed(seed)
    B, L, K = 2, 30, cfg.audio_num_codebooks
    input_ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    placeholders = torch.tensor([ids["audio_token_id"], ids["audio_delay_token_id"]])
    input_ids[torch.isin(input_ids, placeholders)] = ids["bos_token_id"]  # text rows hold no placeholder id
    codes = torch.randint(0, cfg.audio_num_classes, (B, L, K), generator=g)
    audio = torch.zeros(B, L, dtype=torch.bool)
    audio[0, 4:10] = True  # audio in
    audio[0, 15:24] = True  # audio out
    audio[1, 3:12] = True
    attention = torch.ones(B, L, dtype=torch.long)
    attention[1, 20:] = 0
    input_ids[1, 20:] = ids["pad_token_id"]
    ours = (input_ids, attention, codes, audio)
    # transformers: one placeholder id (user audio goes in as <|AUDIO_OUT|> too); a stream's tail may carry
    # the delay id, which is a placeholder as well; the frames packed per row, right-padded.
    hf_ids = input_ids.clone()
    hf_ids[audio] = ids["audio_token_id"]
    hf_ids[0, 22:24] = ids["audio_delay_token_id"]
    n = audio.sum(1)
    frames = torch.zeros(B, int(n.max()), K, dtype=torch.long)
    frames_mask = torch.zeros(B, int(n.max()), dtype=torch.bool)
    for b in range(B):
        frames[b, :n[b]] = codes[b][audio[b]]
        frames_mask[b, :n[b]] = True
    theirs = dict(input_ids=hf_ids, attention_mask=attention, audio_input_ids=frames, audio_input_ids_mask=frames_mask)
    return ours, theirs, attention.bool()


def our_logits(model, batch, valid):
    with torch.no_grad():
        h = model(*batch)[valid]
        return model.text_logits(h), model.audio_logits(h).flatten(1)


def hf_logits(hf, inputs, valid):
    with torch.no_grad():
        h = hf.model(**inputs).last_hidden_state
        return hf.text_lm_head(h)[valid], hf(**inputs).logits[valid]


def test_names_and_config_round_trip():
    cfg = tiny_config()
    names = list(HiggsAudioModel(cfg).state_dict())
    hf_names = [tf.to_transformers_name(n) for n in names]
    assert "model.embed_audio_tokens.embed_audio_tokens.weight" in hf_names and "text_lm_head.weight" in hf_names
    assert [weights.from_transformers_name(n) for n in hf_names] == names
    with pytest.raises(KeyError, match="no counterpart"):
        tf.to_transformers_name("audio_decoder_proj.extra.weight")
    ids = {k: 300 + i for i, k in enumerate(tf.TOKEN_FIELDS)}
    raw = tf.to_transformers_config(cfg, ids, torch.bfloat16)
    assert raw["codebook_size"] == 18 and raw["dtype"] == "bfloat16"
    assert set(raw) <= set(transformers.HiggsAudioV2Config().to_dict())  # no field transformers does not define
    assert ModelConfig(**transformers_config_kwargs(raw, "x")) == cfg
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}  # rope_theta + rope_scaling{"type"}
    legacy.update(rope_theta=cfg.rope_theta, rope_scaling={"type": "llama3", **{k: cfg.rope_scaling[k] for k in
                                                                                 ROPE_KEYS}})
    assert ModelConfig(**transformers_config_kwargs(legacy, "x")) == cfg
    with pytest.raises(ValueError, match="codebook_size=1024 must be audio_stream_eos_id"):
        transformers_config_kwargs({**raw, "codebook_size": 1024, "audio_stream_eos_id": 17}, "x")
    released = ModelConfig.from_preset("higgs-v2-3b")
    assert tf.to_transformers_config(released, ids, torch.bfloat16)["codebook_size"] == 1026


def test_merged_export_loads_strictly_and_gives_our_logits(trained):
    d, model = trained["dir"], trained["model"]
    assert len(json.loads((d / "merged" / "model.safetensors.index.json").read_text())["weight_map"]) == 33
    assert len(list((d / "merged").glob("model-*-of-*.safetensors"))) > 1
    hf = load_hf(d / "merged")
    assert hf.dtype == torch.float32
    theirs_sd, merged = hf.state_dict(), copy.deepcopy(model)
    merge_lora(merged)
    for name, t in base_state(merged).items():  # every tensor as written, none re-initialized on load
        assert torch.equal(theirs_sd[tf.to_transformers_name(name)], t), name
    ours, theirs, valid = mixed_batch(model.config, trained["ids"])
    text, audio = our_logits(model, ours, valid)
    hf_text, hf_audio = hf_logits(hf, theirs, valid)
    base_text, _ = our_logits(trained["base"], ours, valid)
    assert (text - base_text).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(hf_text, text, rtol=0, atol=1e-4)
    torch.testing.assert_close(hf_audio, audio, rtol=0, atol=1e-4)
    # transformers' tokenizer files name the same ids as the config
    at = transformers.AutoTokenizer.from_pretrained(str(d / "merged"))
    assert at.convert_tokens_to_ids(tf.DELAY_TOKEN) == hf.config.audio_delay_token_id < hf.config.vocab_size
    assert at.eos_token_id == hf.config.eos_token_id


def test_adapter_through_peft_onto_transformers_base(trained):
    d, model = trained["dir"], trained["model"]
    keys = json.loads((d / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "audio_lm_head" in keys and "q_proj" in keys
    hf = peft.PeftModel.from_pretrained(load_hf(d / "base"), str(d / "adapter")).eval()
    ours, theirs, valid = mixed_batch(model.config, trained["ids"], seed=1)
    text, audio = our_logits(model, ours, valid)
    with torch.no_grad():
        h = hf.base_model.model.model(**theirs).last_hidden_state
        hf_text, hf_audio = hf.base_model.model.text_lm_head(h)[valid], hf(**theirs).logits[valid]
    torch.testing.assert_close(hf_text, text, rtol=0, atol=1e-4)
    torch.testing.assert_close(hf_audio, audio, rtol=0, atol=1e-4)


def test_fp64_agrees_to_1e5_and_bf16_dtype_is_recorded(trained, tmp_path):
    model = copy.deepcopy(trained["model"]).double()
    merged = copy.deepcopy(model)
    merge_lora(merged)
    write_hf(merged, tmp_path / "f64", trained["tok"], torch.float64)
    hf = load_hf(tmp_path / "f64")
    assert hf.dtype == torch.float64
    ours, theirs, valid = mixed_batch(model.config, trained["ids"], seed=2)
    text, audio = our_logits(model, ours, valid)
    hf_text, hf_audio = hf_logits(hf, theirs, valid)
    torch.testing.assert_close(hf_text, text, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_audio, audio, rtol=0, atol=1e-5)
    write_hf(trained["base"], tmp_path / "bf16", trained["tok"], torch.bfloat16)
    assert load_hf(tmp_path / "bf16").dtype == torch.bfloat16  # the config's dtype is the weights' dtype


def test_transformers_greedy_generate_runs(trained):
    hf = load_hf(trained["dir"] / "merged")
    ids = trained["ids"]
    prompt = torch.tensor([[ids["bos_token_id"], 0, 1, 2, ids["eos_token_id"], ids["audio_bos_token_id"]]])
    audio = hf.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert audio.shape == (1, 6, hf.config.num_codebooks)
    assert int(audio.max()) < hf.config.codebook_size


FIELDS = [("audio_dual_ffn_layers", [0]), ("audio_ffn_intermediate_size", 80), ("use_delay_pattern", False)]
if "audio_embed_avg" in {f.name for f in dataclasses.fields(ModelConfig)}:
    FIELDS.append(("audio_embed_avg", True))


@pytest.mark.parametrize("field,value", FIELDS)
def test_unexpressible_field_is_refused_by_name(trained, field, value):
    with pytest.raises(tf.NotExpressible, match=f"^cannot export.*: {field}="):
        tf.to_transformers_config(tiny_config(**{field: value}), trained["ids"], torch.float32)


def write_released_base(folder, model):
    """A base folder in the released format (text_config + top-level audio fields) with model.safetensors."""
    from safetensors.torch import save_file

    cfg = model.config
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    text = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                         "rope_theta", "rope_scaling", "initializer_range")}
    audio = {k: getattr(cfg, k) for k in ("audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id",
                                          "audio_stream_eos_id", "audio_dual_ffn_layers",
                                          "audio_ffn_intermediate_size", "use_delay_pattern")}
    (folder / "config.json").write_text(json.dumps({"text_config": text, **audio,
                                                    "audio_adapter_type": "dual_ffn_fast_forward"}))
    return folder


def test_cli_refuses_partial_dual_ffn_in_one_line(trained, tmp_path):
    """As a user sees it: a fresh process, one line naming the field, no traceback, no folder."""
    import subprocess
    import sys

    from tests.trainutil import ROOT, env

    torch.manual_seed(0)
    base = write_released_base(tmp_path / "base", HiggsAudioModel(tiny_config(audio_dual_ffn_layers=[1])))
    proc = subprocess.run([sys.executable, "-m", "higgs_min.export", "--format", "transformers", str(base),
                           "--out", str(tmp_path / "out"), "--tokenizer", str(trained["tok"])],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 1 and "audio_dual_ffn_layers=[1]" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_transformers_folder_is_a_base(trained, tmp_path):
    folder = trained["dir"] / "base"
    cfg = ModelConfig.from_pretrained_config(folder)
    assert cfg == trained["base"].config
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    load_pretrained(model, folder)
    for k, v in trained["base"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # and the trainer fine-tunes it: one step on a two-line data set in its own codebook shape
    from tests.trainutil import run
    write_codes(tmp_path / "codes" / "a.npy", K=4, T=5, C=16)
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(), conversation()])
    assert run(tmp_path / "out", "--base-weights", folder, "--tokenizer", trained["tok"], "--data", data,
               "--max-steps", "1", "--batch-size", "2") == 0
    assert (tmp_path / "out" / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_cli_exports_a_preset_run_and_a_run_on_transformers_weights(trained, tmp_path):
    """The base of a preset run is rebuilt from its recorded preset and seed (--base-only writes it); a run
    trained with --base-weights on a transformers folder. Merged, and adapter-only through PEFT onto the base,
    each equals load_trained's base + adapter."""
    from higgs_min.train.runs import load_trained
    from tests.trainutil import run

    write_codes(tmp_path / "codes" / "a.npy", K=4, T=5, C=16)
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(), conversation()])
    assert run(tmp_path / "run", "--base-weights", trained["dir"] / "base", "--tokenizer", trained["tok"],
               "--data", data, "--max-steps", "2", "--batch-size", "2", "--lora-targets", ",".join(TARGETS)) == 0
    assert run(tmp_path / "preset", "--max-steps", "1", "--batch-size", "2", "--seed", "3") == 0
    preset = tmp_path / "preset" / "checkpoint-1"
    assert export_main(["--format", "transformers", str(preset), "--out", str(tmp_path / "pb"), "--base-only"]) == 0
    for ckpt, base in ((tmp_path / "run" / "checkpoint-2", trained["dir"] / "base"), (preset, tmp_path / "pb")):
        assert export_main(["--format", "transformers", str(ckpt), "--out", str(tmp_path / "hf" / ckpt.name)]) == 0
        hf = load_hf(tmp_path / "hf" / ckpt.name)
        ours = load_trained(ckpt).model
        ours_in, theirs, valid = mixed_batch(ours.config, hf.config.to_dict(), seed=3)
        text, audio = our_logits(ours, ours_in, valid)
        hf_text, hf_audio = hf_logits(hf, theirs, valid)
        torch.testing.assert_close(hf_text, text, rtol=0, atol=1e-4)
        torch.testing.assert_close(hf_audio, audio, rtol=0, atol=1e-4)
        out = tmp_path / ("adapter-" + ckpt.parent.name)
        assert export_main(["--format", "transformers", str(ckpt), "--out", str(out), "--adapter-only"]) == 0
        peft_model = peft.PeftModel.from_pretrained(load_hf(base), str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**theirs).logits[valid], audio, rtol=0, atol=1e-4)


def test_released_shape_matches_transformers_on_meta():
    """At the released size (meta device, no weights): every tensor name and shape of transformers' model built
    from the exported config is the renamed tensor of higgs_min's, and codebook_size is 1026."""
    cfg = ModelConfig.from_preset("higgs-v2-3b")
    ids = {k: 128000 + i for i, k in enumerate(tf.TOKEN_FIELDS)}
    raw = tf.to_transformers_config(cfg, ids, torch.bfloat16)
    assert raw["codebook_size"] == 1026
    with torch.device("meta"):
        ours = HiggsAudioModel(cfg)
        theirs = transformers.HiggsAudioV2ForConditionalGeneration(
            transformers.HiggsAudioV2Config.from_dict(raw), use_text_head=True)
    want = {tf.to_transformers_name(k): tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == want
    assert len(want) == 397
