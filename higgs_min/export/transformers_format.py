"""transformers' HiggsAudioV2 format: tensor names, config.json, model and adapter folders.

transformers (5.x) ships Higgs Audio v2 as `HiggsAudioV2ForConditionalGeneration`. It computes what
higgs_min computes (an audio FFN in every layer, summed codebook embeddings, the delay pattern), but
under other tensor names, with a flat config.json, and it cannot express a few things the released
format can. This module is the one place that knows the difference:

    NAME_MAP / to_transformers_name / from_transformers_name    tensor and module names, both ways
    check_expressible(cfg)       refuse, in one line naming the field, a model transformers would compute differently
    to_transformers_config(...)  ModelConfig -> config.json (only fields HiggsAudioV2Config defines)
    config_kwargs(raw)           transformers config.json -> ModelConfig keyword arguments
    export_tokenizer(...)        tokenizer.json with the audio placeholder / bos / delay ids checked or added
    write_model_folder(...)      sharded safetensors + index + config.json + tokenizer files, all or nothing
    adapter_to_transformers(...) PEFT adapter keys and target patterns for transformers' module tree

Facts it relies on (transformers 5.24, models/higgs_audio_v2/modeling_higgs_audio_v2.py):
- the audio head has num_codebooks * codebook_size rows and codebook k is offset by k * codebook_size in
  `embed_audio_tokens`, so codebook_size is higgs_min's C + 2 (1026 for the released head);
- the text head exists only when the model is built with `use_text_head=True` (a keyword, not a config
  field; `from_pretrained(DIR)` without it drops `text_lm_head.weight` silently);
- positions whose input id is `audio_token_id` or `audio_delay_token_id` take the audio embedding and
  the audio FFN; `generate()` writes `audio_delay_token_id` after a stream ends, so it must be in the vocabulary;
- `from_pretrained` takes the dtype from the config's `dtype` field.

What `python -m higgs_min.export --format transformers` writes and refuses:
- the merged folder: model-0000i-of-0000N.safetensors + model.safetensors.index.json, config.json holding only
  fields HiggsAudioV2Config defines (no `use_text_head` field: it would swallow the keyword), tokenizer.json +
  tokenizer_config.json. The LoRA is merged into the base the run trained on (its recorded --base-weights, or
  its preset rebuilt from the recorded seed by runs.load_trained) in fp32 and cast once; the weights keep the
  base's dtype (float32 for a preset; --dtype changes it) and config.json's `dtype` says which. A base folder
  given instead of a checkpoint is converted as it is; --base-only writes a run's base without its LoRA (for a
  preset run, the base an --adapter-only export loads onto: peft.PeftModel.from_pretrained(
  HiggsAudioV2ForConditionalGeneration.from_pretrained(BASE, use_text_head=True), "hf-adapter")).
- names: NAME_MAP, after transformers' convert_higgs_audio_v2_to_hf.py (the wheel does not ship it):
  layers.N.… -> model.layers.N.…, audio_codebook_embeddings -> model.embed_audio_tokens.embed_audio_tokens,
  audio_decoder_proj. dropped from the heads; adapter keys gain the same `model.` level
  (base_model.model.model.layers.N.…) and prefixed target_modules are renamed.
- one audio placeholder there: user audio (<|AUDIO|> here) goes in as <|AUDIO_OUT|> positions, the frames as
  audio_input_ids (B, F, K) with audio_input_ids_mask. The exported tokenizer carries audio_delay_token_id
  <|reserved_special_token_6|> (id 128014 in the released tokenizer; added at the next free id, 705, to the
  demo tokenizer).
- refused in one line naming the field: audio_dual_ffn_layers not covering every layer,
  audio_ffn_intermediate_size != intermediate_size, use_delay_pattern false, audio_embed_avg true,
  hidden_size not a multiple of num_attention_heads, any config field added later at a non-default value.
- the reverse: `train --base-weights DIR` accepts such a folder (model_type higgs_audio_v2 in its config.json;
  it must hold text_lm_head.weight), so a transformers-format checkpoint can be fine-tuned here.

Reading such a folder is the core's job (config.py: the config; weights.py: the tensor names); this module
writes them. It imports nothing from transformers (a test-only dependency).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from higgs_min import atomic
from higgs_min.config import MODEL_TYPE, ROPE_KEYS
from higgs_min.weights import NAME_MAP, to_transformers_name

ARCHITECTURE = "HiggsAudioV2ForConditionalGeneration"

# transformers' config.json id fields -> the token each one names. "<|reserved_special_token_6|>" is id 128014 in
# the released tokenizer, HiggsAudioV2Config's default audio_delay_token_id; a tokenizer without it gets it added.
DELAY_TOKEN = "<|reserved_special_token_6|>"
TOKEN_FIELDS = {
    "bos_token_id": "<|begin_of_text|>",
    "eos_token_id": "<|eot_id|>",  # generate() ends a sequence with it once every audio stream has ended
    "pad_token_id": "<|end_of_text|>",  # the released config's pad id; higgs_min pads batches with it
    "audio_token_id": "<|AUDIO_OUT|>",  # the one audio placeholder: user audio (<|AUDIO|> here) goes in as it too
    "audio_bos_token_id": "<|audio_out_bos|>",
    "audio_delay_token_id": DELAY_TOKEN,
}
# The released text_config.max_position_embeddings (Llama-3.2). higgs_min has no position limit; transformers only
# reads it for dynamic RoPE types and to check original_max_position_embeddings against it.
MAX_POSITIONS = 131072
SHARD_BYTES = 2 << 30

# ModelConfig fields this module translates or checks; any other field must keep its default (which is the
# released model's behaviour) or the export is refused, so a field added later is never dropped silently.
KNOWN_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "initializer_range",
    "audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id", "audio_stream_eos_id",
    "audio_dual_ffn_layers", "audio_ffn_intermediate_size", "use_delay_pattern", "audio_embed_avg",
    "audio_adapter_type",
}


class NotExpressible(ValueError):
    """The model uses something transformers' HiggsAudioV2 cannot express; the message names the field."""


# --------------------------------------------------------------------------- config

def unexpressible(cfg) -> list[str]:
    """Each way `cfg` differs from what transformers' HiggsAudioV2 computes, as 'field=value: why'."""
    L = cfg.num_hidden_layers
    out = []
    if sorted(cfg.audio_dual_ffn_layers) != list(range(L)):
        out.append(f"audio_dual_ffn_layers={list(cfg.audio_dual_ffn_layers)}: transformers' HiggsAudioV2DecoderLayer "
                   f"has the audio FFN in every layer (DualFFN in only some of the {L} layers is not expressible)")
    if cfg.audio_ffn_intermediate_size != cfg.intermediate_size:
        out.append(f"audio_ffn_intermediate_size={cfg.audio_ffn_intermediate_size}: transformers sizes audio_mlp "
                   f"by intermediate_size={cfg.intermediate_size}")
    if not cfg.use_delay_pattern:
        out.append("use_delay_pattern=False: transformers' generate() always applies the codebook delay pattern")
    if getattr(cfg, "audio_embed_avg", False):
        out.append("audio_embed_avg=True: transformers' HiggsAudioV2Embeddings sums the codebook embeddings")
    if cfg.hidden_size % cfg.num_attention_heads:
        out.append(f"num_attention_heads={cfg.num_attention_heads}: HiggsAudioV2Config requires hidden_size "
                   f"({cfg.hidden_size}) to be a multiple of it")
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type") != "llama3":
        out.append(f"rope_scaling={rs}: only llama3 scaling is translated")
    if dataclasses.is_dataclass(cfg):
        defaults = type(cfg)()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name not in KNOWN_FIELDS and value != getattr(defaults, f.name):
                out.append(f"{f.name}={value!r}: no counterpart in transformers' HiggsAudioV2Config")
    return out


def check_expressible(cfg) -> None:
    problems = unexpressible(cfg)
    if problems:
        raise NotExpressible("cannot export to transformers' HiggsAudioV2 format: " + "; ".join(problems))


def to_transformers_config(cfg, token_ids: dict[str, int], dtype: torch.dtype) -> dict:
    """The config.json that makes HiggsAudioV2ForConditionalGeneration compute what `cfg` computes.

    token_ids: every key of TOKEN_FIELDS. dtype: the dtype of the weights written beside it.
    """
    check_expressible(cfg)
    missing = sorted(set(TOKEN_FIELDS) - set(token_ids))
    if missing:
        raise ValueError(f"token ids missing for {missing}")
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": float(cfg.rope_theta),
                **{k: cfg.rope_scaling[k] for k in ROPE_KEYS}}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "max_position_embeddings": max(MAX_POSITIONS, int(rope.get("original_max_position_embeddings", 0))),
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "num_codebooks": cfg.audio_num_codebooks,
        "codebook_size": cfg.audio_codebook_size + 2,  # the stream BOS and EOS are rows of the head too
        "audio_stream_bos_id": cfg.audio_stream_bos_id,
        "audio_stream_eos_id": cfg.audio_stream_eos_id,
        **{k: int(token_ids[k]) for k in TOKEN_FIELDS},
    }


# --------------------------------------------------------------------------- tokenizer

def export_tokenizer(tokenizer_path: str | Path, vocab_size: int) -> tuple[str, dict[str, int]]:
    """(tokenizer.json text, {config field: id}). Adds DELAY_TOKEN at the next free id when it is missing."""
    from tokenizers import AddedToken, Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise ValueError(f"{tokenizer_path}: cannot load tokenizer: {e}") from e
    if tok.token_to_id(DELAY_TOKEN) is None:
        tok.add_special_tokens([AddedToken(DELAY_TOKEN, special=True, normalized=False)])
    ids = {}
    for field, token in TOKEN_FIELDS.items():
        tid = tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{tokenizer_path}: token {token} (for {field}) is not in the tokenizer")
        if tid >= vocab_size:
            raise ValueError(f"{tokenizer_path}: {token} (for {field}) would get id {tid}, "
                             f"not below the model's vocab_size {vocab_size}")
        ids[field] = tid
    return tok.to_str(), ids


def tokenizer_config() -> dict:
    """tokenizer_config.json for AutoTokenizer: the fast tokenizer in tokenizer.json and its special tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": TOKEN_FIELDS["bos_token_id"],
        "eos_token": TOKEN_FIELDS["eos_token_id"],
        "pad_token": TOKEN_FIELDS["pad_token_id"],
        "clean_up_tokenization_spaces": False,
    }


# --------------------------------------------------------------------------- folders

def _staged(out: Path):
    """The atomic writer's staged folder: `out` appears only complete (files 0644, folder 0755 under umask 022)."""
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic.staged_folder(out)


def write_model_folder(out: str | Path, state: dict[str, torch.Tensor], config: dict, tokenizer_json: str | None,
                       shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `state` (higgs_min names) under transformers' names, cast to config["dtype"], as
    model-0000i-of-0000N.safetensors shards + model.safetensors.index.json, with config.json and the
    tokenizer files. Written into a temporary sibling and renamed: the folder appears only complete."""
    from safetensors.torch import save_file

    dtype = getattr(torch, config["dtype"])
    names = {to_transformers_name(n): n for n in state}
    if len(names) != len(state):
        raise ValueError("two tensors map to the same transformers name")
    shards, size = [[]], 0
    for name in names:
        nbytes = state[names[name]].numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out = Path(out)
    with _staged(out) as tmp:
        weight_map, total = {}, 0
        for i, group in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: state[names[n]].detach().to("cpu", dtype).contiguous() for n in group}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in group})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(tokenizer_config(), indent=2) + "\n")
    return out


def _matches(path: str, pattern: str) -> bool:
    """PEFT's target rule (as lora.matches): the pattern is the module path or a dotted suffix of it."""
    return path == pattern or path.endswith("." + pattern)


def _translate_pattern(pattern: str) -> str:
    probe = pattern + "."
    return to_transformers_name(pattern) if any(probe.startswith(src) for src, _ in NAME_MAP) else pattern


def adapter_to_transformers(adapter_cfg: dict, tensors: dict[str, torch.Tensor], linear_modules: list[str],
                            prefix: str = "base_model.model.") -> tuple[dict, dict[str, torch.Tensor]]:
    """A higgs_min PEFT adapter -> the same adapter for transformers' module tree.

    Keys `base_model.model.layers.N.…` become `base_model.model.model.layers.N.…` (heads lose
    `audio_decoder_proj.`); target patterns are renamed the same way where they name a prefixed path.
    linear_modules: every linear module path of the higgs_min model; the renamed patterns must select
    exactly the renamed modules the original patterns select.
    """
    out = {}
    for key, t in tensors.items():
        module, sep, part = key.rpartition(".lora_")
        if not key.startswith(prefix) or not sep:
            raise KeyError(f"adapter tensor {key!r} is not a PEFT LoRA key under {prefix!r}")
        out[f"{prefix}{to_transformers_name(module[len(prefix):])}{sep}{part}"] = t
    patterns = adapter_cfg["target_modules"]
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    new_patterns = [_translate_pattern(p) for p in patterns]
    chosen = {to_transformers_name(m) for m in linear_modules if any(_matches(m, p) for p in patterns)}
    mapped = [to_transformers_name(m) for m in linear_modules]
    rechosen = {m for m in mapped if any(_matches(m, p) for p in new_patterns)}
    if chosen != rechosen:
        raise ValueError(f"target_modules {patterns} select different modules after renaming to {new_patterns}: "
                         f"{sorted(chosen ^ rechosen)[:3]}")
    return {**adapter_cfg, "target_modules": new_patterns}, out


def write_adapter_folder(out: str | Path, adapter_cfg: dict, tensors: dict[str, torch.Tensor],
                         extra: dict[str, str] | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT's file names) and `extra` text files (the
    run's prompt.json), all or nothing."""
    from safetensors.torch import save_file

    out = Path(out)
    with _staged(out) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return out
