"""The audio tokenizer's files as users download them: three layouts, read into the official names.

    original      config.json (n_filters, D, ratios, bins, n_q, ...) + model.pth, or the model.safetensors
                  that `prepare convert-audio-tokenizer` writes. Names: the official HiggsAudioTokenizer's
                  (= ours); DAC weight norm as weight_g/weight_v.
    transformers  config.json (model_type higgs_audio_v2_tokenizer, acoustic_model_config,
                  semantic_model_config, target_bandwidths) + model.safetensors, or
                  model.safetensors.index.json + shards. Names: transformers' HiggsAudioV2TokenizerModel;
                  DAC weight norm folded or as parametrizations. Its conversion script folds as g * v / |v|,
                  not torch._weight_norm: ~43% of the elements differ in the last bits (a (1024, 1024, 7)
                  conv), so files it converted carry another identity than the model.pth they came from.
    v3            a Higgs Audio v3 model folder: the same transformers-named codec under the prefix
                  tied.embedding.modality_embeddings.0.model. inside the model's safetensors (sglang-omni
                  0.1.9 higgs_tts/audio_codec.py `load_codec_state_dict`). Only the prefixed tensors are
                  read (safe_open, one tensor at a time); the LLM's are never loaded. Its architecture is
                  the released transformers config (RELEASED), as sglang-omni's bundled copy of it.

`read_folder` tells the layouts apart by config.json and returns the config in the original layout's
form and the tensors as stored; `fold_weight_norm`, `to_our_names` and `check_and_filter` then turn
them into the official names, folded and checked (audio/tokenizer.py `load_state`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from higgs_min.v3.weights import CODEC_PREFIX as V3_PREFIX  # where a v3 checkpoint keeps the codec
from higgs_min.weights import weight_files

log = logging.getLogger("higgs_min.audio.tokenizer")
TRANSFORMERS_TYPE = "higgs_audio_v2_tokenizer"


class AudioTokenizerError(ValueError):
    """Bad tokenizer files: the message names the file and the tensors or fields."""


# ---- the name table: official (ours) -> transformers ---------------------------------------------
# transformers' conversion script renames the released model.pth's names with these substitutions, applied
# in order to each name (src/transformers/models/higgs_audio_v2_tokenizer/convert_higgs_audio_v2_tokenizer_to_hf.py,
# ORIGINAL_TO_CONVERTED_KEY_MAPPING and convert_key). The DAC Encoder is Sequential [conv, 5 blocks, snake, conv],
# each block [3 residual units, snake, conv]; the Decoder [conv, 5 blocks, snake, conv], each block
# [snake, conv_t, 3 residual units]; a residual unit is [snake, conv, snake, conv] (audio/layers.py).
UNIT = ("snake1", "conv1", "snake2", "conv2")
NAME_TABLE = (
    (r"^encoder\.block\.0\.", "acoustic_encoder.conv1."),
    (r"^encoder\.block\.6\.", "acoustic_encoder.snake1."),
    (r"^encoder\.block\.7\.", "acoustic_encoder.conv2."),
    (r"^encoder\.block\.(\d)\.block\.([012])\.block\.(\d)\.",
     lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{UNIT[int(m[3])]}."),
    (r"^encoder\.block\.(\d)\.block\.3\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.snake1."),
    (r"^encoder\.block\.(\d)\.block\.4\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.conv1."),
    (r"^decoder_2\.model\.0\.", "acoustic_decoder.conv1."),
    (r"^decoder_2\.model\.6\.", "acoustic_decoder.snake1."),
    (r"^decoder_2\.model\.7\.", "acoustic_decoder.conv2."),
    (r"^decoder_2\.model\.(\d)\.block\.0\.", lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.snake1."),
    (r"^decoder_2\.model\.(\d)\.block\.1\.", lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.conv_t1."),
    (r"^decoder_2\.model\.(\d)\.block\.([234])\.block\.(\d)\.",
     lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) - 1}.{UNIT[int(m[3])]}."),
    (r"^quantizer\.vq\.layers\.", "quantizer.quantizers."),
    (r"\._codebook\.", ".codebook."),
    (r"^fc_prior\.", "fc."),
    (r"^fc_post1\.", "fc1."),
    (r"^fc_post2\.", "fc2."),
    (r"\.conv\.conv\.", ".conv."),  # the semantic encoder's wrapped convs, unwrapped
    (r"\.conv1\.conv\.", ".conv1."),
    (r"\.conv2\.conv\.", ".conv2."),
)
# Tensors inference never reads (the official training path), in each naming: the same tensors under the table.
TRAINING_ONLY = (
    r"fc_post1\..*",                                    # semantic reconstruction head (official forward L227)
    r"decoder_semantic\..*",                            # semantic decoder (forward L232)
    r"semantic_model\.masked_spec_embed",               # HuBERT SpecAugment vector (masking is off)
    r"quantizer\.vq\.layers\.\d+\._codebook\.(inited|cluster_size|embed_avg)",  # EMA codebook bookkeeping
)
TRANSFORMERS_TRAINING_ONLY = (r"fc1\..*", r"decoder_semantic\..*", r"semantic_model\.masked_spec_embed",
                              r"quantizer\.quantizers\.\d+\.codebook\.(inited|cluster_size|embed_avg)")


def transformers_name(ours: str) -> str:
    for pattern, repl in NAME_TABLE:
        ours = re.sub(pattern, repl, ours)
    return ours


def to_our_names(tensors: dict, ours) -> dict:
    """transformers-named tensors -> the official names of `ours` (the model's names) through NAME_TABLE.
    Training-only tensors are dropped; any other name is kept as it is, for check_and_filter to report."""
    back = {transformers_name(k): k for k in ours}
    return {back.get(k, k): v for k, v in tensors.items()
            if not any(re.fullmatch(p, k) for p in TRANSFORMERS_TRAINING_ONLY)}


# ---- the transformers config ---------------------------------------------------------------------
# The released architecture, as bosonai/higgs-audio-v2-tokenizer's config.json gives it (sglang-omni 0.1.9
# ships that file as sglang_omni/models/higgs_tts/configs/higgs_audio_v2_tokenizer.json): every field that
# changes what encode/decode compute. A config that differs in one of them is refused, naming it, widths
# included: the code could run another width, but its codes would not be the ones the released model reads.
RELEASED = {
    "sample_rate": 24000, "semantic_sample_rate": 16000, "downsample_factor": 320,
    "target_bandwidths": [0.5, 1, 1.5, 2], "codebook_size": 1024, "codebook_dim": 64, "kernel_size": 3,
    "unit_kernel_size": 3, "channel_ratios": [1, 1], "strides": [1, 1], "block_dilations": [1, 1],
    "acoustic_model_config": {"model_type": "dac", "hidden_size": 256, "encoder_hidden_size": 64,
                              "decoder_hidden_size": 1024, "downsampling_ratios": [8, 5, 4, 2, 3],
                              "upsampling_ratios": [8, 5, 4, 2, 3]},
    "semantic_model_config": {"model_type": "hubert", "hidden_size": 768, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "intermediate_size": 3072, "conv_dim": [512] * 7,
                              "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
                              "num_feat_extract_layers": 7, "num_conv_pos_embeddings": 128,
                              "num_conv_pos_embedding_groups": 16, "layer_norm_eps": 1e-5, "conv_bias": False,
                              "feat_extract_norm": "group", "feat_extract_activation": "gelu", "hidden_act": "gelu",
                              "do_stable_layer_norm": False, "feat_proj_layer_norm": True,
                              "conv_pos_batch_norm": False},
}
# Fields without effect on encode/decode: transformers' PreTrainedConfig bookkeeping (in every config and
# sub-config), training (dropout, masking, losses), the DAC's own quantizer (HiggsAudioV2TokenizerModel keeps
# only its encoder and decoder) and HuBERT's CTC/classifier heads.
GENERIC = {"model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
           "initializer_range", "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
           "is_encoder_decoder", "id2label", "label2id", "problem_type"}
NO_EFFECT = {
    "": GENERIC,
    "acoustic_model_config": GENERIC | {"codebook_dim", "codebook_size", "n_codebooks", "codebook_loss_weight",
                                        "commitment_loss_weight", "quantizer_dropout", "sampling_rate", "hop_length"},
    "semantic_model_config": GENERIC | {"activation_dropout", "attention_dropout", "feat_proj_dropout",
                                        "final_dropout", "hidden_dropout", "layerdrop", "apply_spec_augment",
                                        "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                                        "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks",
                                        "ctc_loss_reduction", "ctc_zero_infinity", "vocab_size", "bos_token_id",
                                        "eos_token_id", "pad_token_id", "classifier_proj_size",
                                        "use_weighted_layer_sum"},
}
HUBERT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                 "conv_kernel", "conv_stride", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
                 "layer_norm_eps")


def num_quantizers(c: dict) -> int:
    """HiggsAudioV2TokenizerConfig.num_quantizers: the top bandwidth's bits per second / bits per frame."""
    frame_rate = math.ceil(c["sample_rate"] / math.prod(c["acoustic_model_config"]["downsampling_ratios"]))
    return int(1000 * c["target_bandwidths"][-1] // (frame_rate * math.ceil(math.log2(c["codebook_size"]))))


def _differences(raw: dict, released: dict, where: str = "") -> list[str]:
    """'field=value (released: value)' for each architecture field that differs or is absent, and each
    field that is neither an architecture field nor one of NO_EFFECT; sub-configs compared field by field."""
    unknown = sorted(set(raw) - set(released) - NO_EFFECT[where.rstrip(".")])
    out = [f"{where}{key} is not a field of the released config" for key in unknown]
    for key, want in released.items():
        name = where + key
        if key not in raw:
            out.append(f"{name} is absent (released: {json.dumps(want)})")
        elif isinstance(want, dict):
            out += (_differences(raw[key], want, name + ".") if isinstance(raw[key], dict)
                    else [f"{name}: not an object"])
        elif key != "target_bandwidths" and raw[key] != want:  # target_bandwidths: by the quantizers it gives
            out.append(f"{name}={json.dumps(raw[key])} (released: {json.dumps(want)})")
    return out


def transformers_config(raw: dict, path) -> dict:
    """A transformers HiggsAudioV2TokenizerConfig dict -> the original layout's config dict (the form
    AudioTokenizerConfig.from_json_dict reads). Every architecture field must have its released value."""
    problems = _differences(raw, RELEASED, "")
    if not problems:
        try:
            n_q = num_quantizers(raw)
        except (TypeError, ValueError, IndexError):
            n_q = None
        if n_q != num_quantizers(RELEASED):
            problems.append(f"target_bandwidths={json.dumps(raw['target_bandwidths'])} gives {n_q} quantizers "
                            f"(released: {json.dumps(RELEASED['target_bandwidths'])}, {num_quantizers(RELEASED)})")
    if problems:
        raise AudioTokenizerError(f"{path}: not the released Higgs Audio v2 tokenizer architecture (the only one "
                                  f"implemented): {'; '.join(problems)}")
    a, s = raw["acoustic_model_config"], raw["semantic_model_config"]
    return {"D": a["hidden_size"], "codebook_dim": raw["codebook_dim"], "ratios": a["downsampling_ratios"],
            "sample_rate": raw["sample_rate"], "bins": raw["codebook_size"], "n_q": num_quantizers(raw),
            "semantic_techer": "hubert_base_general", "encoder_dim": a["encoder_hidden_size"],
            "decoder_dim": a["decoder_hidden_size"], "hubert": {k: s[k] for k in HUBERT_FIELDS}}


# ---- reading the folder --------------------------------------------------------------------------

@dataclass
class Found:
    """What read_folder found: the layout, its config in the original form, the tensors as stored
    (prefix stripped), the file they came from, and the prefix their names carry in it."""
    layout: str  # "original", "transformers" or "v3"
    config: dict
    tensors: dict
    source: Path
    prefix: str = ""

    @property
    def transformers_names(self) -> bool:
        return self.layout != "original"


def read_safetensors(folder: Path, prefix: str = "") -> tuple[dict, Path]:
    """{name without prefix: tensor} for the names starting with `prefix`, from model.safetensors or the
    shards model.safetensors.index.json lists (higgs_min.weights.weight_files). safe_open maps each file
    and copies only the tensors asked for: a v3 checkpoint's LLM tensors are never read."""
    try:
        name_to_file, index = weight_files(folder)
    except Exception as e:  # a bad index, no weights file, or safetensors' own error types on a bad header
        raise AudioTokenizerError(f"{folder}: no readable model.safetensors or its index: {e}") from e
    source = index or folder / "model.safetensors"
    wanted: dict = {}
    for name, file in name_to_file.items():
        if name.startswith(prefix):
            wanted.setdefault(file, []).append(name)
    out = {}
    for file, names in wanted.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise AudioTokenizerError(f"{source}: lists {name} in {file.name}, which does not hold it")
                    out[name[len(prefix):]] = f.get_tensor(name)
        except AudioTokenizerError:
            raise
        except Exception as e:  # safetensors raises its own error types; say which file
            raise AudioTokenizerError(f"{file}: not a readable safetensors file: {e}") from e
    return out, source


def read_pth(path: Path) -> dict:
    """model.pth, read with torch.load(weights_only=True): a dict of tensors and nothing else."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for any non-allowlisted object, or a corrupt file
        raise AudioTokenizerError(f"{path}: refused by torch.load(weights_only=True) (only a dict of tensors is "
                                  f"read; nothing else is unpickled): {str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict):
        raise AudioTokenizerError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AudioTokenizerError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return obj


def read_folder(folder: str | Path) -> Found:
    """Tell the layout by config.json: no model_type -> original; higgs_audio_v2_tokenizer -> transformers;
    any other (a model's config) -> v3, whose safetensors must hold tensors under V3_PREFIX."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AudioTokenizerError(f"{folder}: no such folder (expected the audio tokenizer: bosonai/higgs-audio-v2-"
                                  "tokenizer's files, or a Higgs Audio v3 model folder; nothing is downloaded)")
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AudioTokenizerError(f"{path}: cannot read the tokenizer config: {e}") from e
    if not isinstance(raw, dict):
        raise AudioTokenizerError(f"{path}: not a JSON object")
    kind = raw.get("model_type")
    if kind is None:
        if (folder / "model.safetensors").exists():
            tensors, source = read_safetensors(folder)
        elif (folder / "model.pth").exists():
            tensors, source = read_pth(folder / "model.pth"), folder / "model.pth"
        else:
            raise AudioTokenizerError(f"{folder}: no model.safetensors or model.pth (nothing is downloaded)")
        return Found("original", raw, tensors, source)
    if kind == TRANSFORMERS_TYPE:
        config = transformers_config(raw, path)
        tensors, source = read_safetensors(folder)
        return Found("transformers", config, tensors, source)
    tensors, source = read_safetensors(folder, V3_PREFIX)
    if not tensors:
        raise AudioTokenizerError(
            f"{source}: no tensor under {V3_PREFIX!r}, where a Higgs Audio v3 checkpoint keeps its audio tokenizer, "
            f"and {path} (model_type {kind!r}) is not a tokenizer config ('{TRANSFORMERS_TYPE}', or the original "
            "layout's); give the tokenizer folder (bosonai/higgs-audio-v2-tokenizer) or a v3 model folder")
    return Found("v3", transformers_config(RELEASED, "the released tokenizer config"), tensors, source, V3_PREFIX)


# ---- folding and checking ------------------------------------------------------------------------

def fold_weight_norm(tensors: dict) -> dict:
    """X.weight_g + X.weight_v (torch.nn.utils.weight_norm) or X.parametrizations.weight.original0/1
    (parametrizations.weight_norm) -> X.weight = torch._weight_norm(v, g, dim), as the official forward
    computes it. dim is 0 (DAC convs, the torch default) except HuBERT's positional conv (dim=2).
    Works in either naming: both end the positional conv's name with pos_conv_embed.conv."""
    out, pairs = {}, {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(.*)\.(weight_g|weight_v|parametrizations\.weight\.original[01])", k)
        if m:
            pairs.setdefault(m[1], {})["g" if m[2] in ("weight_g", "parametrizations.weight.original0") else "v"] = v
        else:
            out[k] = v
    for base, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise AudioTokenizerError(f"{base}: weight norm needs both g and v, found only {sorted(gv)}")
        dim = 2 if base.endswith("pos_conv_embed.conv") else 0
        if gv["g"].shape[dim] != gv["v"].shape[dim] or gv["g"].numel() != gv["v"].shape[dim]:
            raise AudioTokenizerError(f"{base}: weight norm g {tuple(gv['g'].shape)} does not fit v "
                                      f"{tuple(gv['v'].shape)} along dim {dim}")
        out[base + ".weight"] = torch._weight_norm(gv["v"], gv["g"], dim)
    return out


def check_and_filter(tensors: dict, expected: dict, source, n_q: int, shown=lambda k: k) -> dict:
    """Drop TRAINING_ONLY names; raise one error naming missing, unexpected and misshapen tensors (each
    as `shown` spells it: its name in the file). Quantizer layers past n_q are dropped with a warning:
    the official forward uses the first n_q (vq.py get_num_quantizers_for_bandwidth with bandwidth None)
    and loads with strict=False (higgs_audio_tokenizer.py L326)."""
    kept = {k: v for k, v in tensors.items() if not any(re.fullmatch(p, k) for p in TRAINING_ONLY)}
    extra = {k for k in kept if (m := re.match(r"quantizer\.vq\.layers\.(\d+)\.", k)) and int(m[1]) >= n_q}
    if extra:
        layers = sorted({int(k.split(".")[3]) for k in extra})
        log.warning("%s: quantizer layers %s are past n_q=%d and unused (as in the official forward); ignored",
                    source, layers, n_q)
        kept = {k: v for k, v in kept.items() if k not in extra}
    missing = sorted(shown(k) for k in set(expected) - set(kept))
    unexpected = sorted(shown(k) for k in set(kept) - set(expected))
    shapes = sorted(f"{shown(k)} {tuple(kept[k].shape)} (expected {tuple(expected[k])})"
                    for k in set(kept) & set(expected) if tuple(kept[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if names]
        raise AudioTokenizerError(f"{source}: does not match the tokenizer config; " + "; ".join(parts))
    return kept
