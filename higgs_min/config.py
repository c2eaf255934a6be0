"""Model configuration: the released Higgs Audio v2 shape and a tiny one for CPUs.

`ModelConfig` is a flat dataclass. It is built from a preset name or from the
released `config.json` format, in which the Llama backbone's fields live in a
`text_config` block and the audio fields at the top level.

Released-config options honoured (`from_pretrained_config`; a missing field takes the official
`HiggsAudioConfig` default, as the official loader would; official code in boson-ai/higgs-audio):

    audio_adapter_type   "dual_ffn_fast_forward" (the release): layers outside audio_dual_ffn_layers are
                         fast-forward layers: audio rows (in and out) leave them unchanged, text rows attend
                         to text keys only. "dual_ffn": those layers are plain Llama layers for every row.
                         ("stack" is refused.)  HiggsAudioModel.__init__, HiggsAudioDualFFNDecoderLayer(
                         fast_forward=True), fast_forward_attention_mask
    audio_embed_avg      true: a frame embeds as the mean of its K codebook rows, else the sum.
                         HiggsAudioModel._embed_audio_ids
    use_delay_pattern    false: each stream is [BOS | codes | EOS], T + 2 positions, no codebook delay.
                         HiggsAudioSampleCollator.__call__
    (data)               an assistant message followed by another assistant message ends with <|eom_id|>
                         (supervised); the tokenizer needs that token only when such a conversation occurs.
                         prepare_chatml_sample (eom_postfix)

Refused at load with one line naming the field and value (REFUSED_FIELDS and the checks below):
audio_adapter_type "stack", skip_audio_tower false, encode_whisper_embed true, encode_audio_in_tokens false
(there is no Whisper audio tower; audio input is always embedded from its codec codes; audio_encoder_config /
audio_tokenizer_config are not read), use_audio_out_embed_projector, use_audio_out_self_attention,
audio_decoder_proj_num_layers > 0, use_rq_transformer, audio_ffn_hidden_size != hidden_size, and
audio_ffn_intermediate_size != text_config.intermediate_size (the official layer builds audio_mlp =
LlamaMLP(text_config), so that field is ignored there; the released values are equal). Presets built in Python
size audio_mlp by audio_ffn_intermediate_size. The fast-forward masking is implemented for the training
forward (no KV cache); its invariant is tested in tests/test_options.py against a direct formulation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    # Llama backbone
    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # rope_type "llama3" frequency scaling; None means plain RoPE.
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    initializer_range: float = 0.02
    # Audio path
    audio_num_codebooks: int = 8  # K
    audio_codebook_size: int = 1024  # C; stream BOS = C, stream EOS = C + 1
    audio_stream_bos_id: int = 1024
    audio_stream_eos_id: int = 1025
    audio_dual_ffn_layers: list[int] = field(default_factory=lambda: list(range(28)))
    audio_ffn_intermediate_size: int = 8192
    # "dual_ffn": layers not in audio_dual_ffn_layers are plain Llama layers for every row;
    # "dual_ffn_fast_forward" (the release): audio rows skip those layers (see model.py).
    audio_adapter_type: str = "dual_ffn_fast_forward"
    audio_embed_avg: bool = False  # True: an audio frame embeds as the mean of its K codebook rows, not the sum
    use_delay_pattern: bool = True  # False: each stream is [BOS | codes | EOS] with no codebook delay

    @property
    def audio_num_classes(self) -> int:
        """C + 2: the codes plus the stream BOS and EOS."""
        return self.audio_codebook_size + 2

    def validate(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.audio_stream_bos_id != self.audio_codebook_size:
            problems.append(f"audio_stream_bos_id={self.audio_stream_bos_id} != audio_codebook_size")
        if self.audio_stream_eos_id != self.audio_codebook_size + 1:
            problems.append(f"audio_stream_eos_id={self.audio_stream_eos_id} != audio_codebook_size + 1")
        if self.audio_adapter_type not in ADAPTER_TYPES:
            problems.append(f"audio_adapter_type={self.audio_adapter_type!r} is not supported "
                            f"(supported: {', '.join(ADAPTER_TYPES)})")
        bad = [i for i in self.audio_dual_ffn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            problems.append(f"audio_dual_ffn_layers {bad} outside [0, {self.num_hidden_layers})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        cfg = cls(**PRESETS[name])
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained_config(cls, path: str | Path) -> "ModelConfig":
        """Read the released `config.json` (a file, or a folder holding one); transformers' HiggsAudioV2
        format (model_type "higgs_audio_v2") is recognized and translated."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config: {e}") from e
        if is_transformers_config(raw):  # a folder saved in transformers' format
            cfg = cls(**transformers_config_kwargs(raw, str(path)))
            cfg.validate()
            return cfg
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{path}: missing the 'text_config' block of the released format")
        kw = {}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta"):
            if name not in text:
                raise ValueError(f"{path}: text_config.{name} is missing")
            kw[name] = text[name]
        kw["head_dim"] = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
        kw["rope_scaling"] = text.get("rope_scaling")
        kw["initializer_range"] = text.get("initializer_range", 0.02)
        for name in ("audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id",
                     "audio_stream_eos_id", "audio_dual_ffn_layers", "audio_ffn_intermediate_size"):
            if name not in raw:
                raise ValueError(f"{path}: top-level field {name!r} is missing")
            kw[name] = raw[name]
        # The official HiggsAudioConfig defaults (configuration_higgs_audio.py __init__) are NOT the release's
        # (adapter "stack", no delay): a field missing from the file takes the official default, as there.
        kw["audio_adapter_type"] = raw.get("audio_adapter_type", "stack")
        kw["audio_embed_avg"] = raw.get("audio_embed_avg", False)
        kw["use_delay_pattern"] = raw.get("use_delay_pattern", False)
        for name, value in (("audio_adapter_type", kw["audio_adapter_type"]), ("audio_embed_avg", kw["audio_embed_avg"]),
                            ("use_delay_pattern", kw["use_delay_pattern"])):
            if not isinstance(value, str if name == "audio_adapter_type" else bool):
                raise ValueError(f"{path}: {name}={value!r} has the wrong type")
        if kw["audio_adapter_type"] not in ADAPTER_TYPES:
            raise ValueError(f"{path}: audio_adapter_type={kw['audio_adapter_type']!r} is not supported "
                             f"(supported: {', '.join(ADAPTER_TYPES)})")
        for name, official_default, why in REFUSED_FIELDS:
            value = raw.get(name, official_default)
            if value != official_default and not (name == "audio_ffn_hidden_size" and value == kw["hidden_size"]):
                raise ValueError(f"{path}: {name}={value!r} is not supported: {why}")
        # Official HiggsAudioDualFFNDecoderLayer builds audio_mlp = LlamaMLP(text_config): its width is
        # text_config.intermediate_size whatever audio_ffn_intermediate_size says. We refuse a mismatch rather
        # than build a shape the released code would not.
        if kw["audio_ffn_intermediate_size"] != kw["intermediate_size"]:
            raise ValueError(f"{path}: audio_ffn_intermediate_size={kw['audio_ffn_intermediate_size']} != "
                             f"text_config.intermediate_size={kw['intermediate_size']}: the official model sizes "
                             f"audio_mlp by intermediate_size and ignores this field; refusing the ambiguity")
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ADAPTER_TYPES = ("dual_ffn", "dual_ffn_fast_forward")

# Released-format fields higgs_min does not implement: (name, the value we honour, why). Any other value is
# refused at load, naming the field (official defaults from configuration_higgs_audio.py; the release's values
# in shared/reference/config.json are these ones).
REFUSED_FIELDS = (
    ("skip_audio_tower", True, "the Whisper audio tower (audio_tower / audio_encoder_proj) is not implemented; "
                               "audio input is read as codec codes only"),
    ("encode_whisper_embed", False, "Whisper features for audio input need the audio tower (not implemented)"),
    ("encode_audio_in_tokens", True, "audio input is always embedded from its codec codes"),
    ("use_audio_out_embed_projector", False, "the audio-out embedding projector is not implemented"),
    ("use_audio_out_self_attention", False, "the separate audio self-attention (audio_attn) is not implemented"),
    ("audio_decoder_proj_num_layers", 0, "extra decoder-projector layers are not implemented"),
    ("use_rq_transformer", False, "the RQ-transformer head is not implemented"),
    ("audio_ffn_hidden_size", None, "the audio FFN width must equal hidden_size"),
)

PRESETS: dict[str, dict] = {
    # The released bosonai/higgs-audio-v2-generation-3B-base backbone + DualFFN.
    "higgs-v2-3b": {},
    # Same structure, sized to train in minutes on 2 CPU cores. The vocabulary
    # is that of the demo tokenizer (data/tokenizer.json) rounded up; the
    # larger init range gives a randomly initialized, frozen head logits big
    # enough that LoRA alone can fit the demo set (README, "Two commands": with 0.02
    # the text loss floors near 2.0 and the audio loss near 5.3).
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "audio_dual_ffn_layers": [0, 1, 2, 3],
        "audio_ffn_intermediate_size": 688,
        "initializer_range": 0.08,
    },
}


# ----------------------------------------------------------------------------- transformers' config.json
# transformers (5.x) ships Higgs Audio v2 as HiggsAudioV2ForConditionalGeneration with a flat config.json; a base
# folder exported in that format (higgs_min/export/transformers_format.py writes it) is read back here.

MODEL_TYPE = "higgs_audio_v2"
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def is_transformers_config(raw: dict) -> bool:
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


def transformers_config_kwargs(raw: dict, where: str) -> dict:
    """ModelConfig keyword arguments from transformers' config.json (the reverse of to_transformers_config)."""
    def need(name):
        if name not in raw:
            raise ValueError(f"{where}: field {name!r} is missing (transformers' HiggsAudioV2 format)")
        return raw[name]

    for name, ours in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(name, ours) != ours:
            raise ValueError(f"{where}: {name}={raw[name]!r} is not supported (higgs_min's model has {ours!r})")
    rope = raw.get("rope_parameters")
    if rope is None:  # configs written before rope_parameters existed
        rope = {**(raw.get("rope_scaling") or {}), "rope_theta": need("rope_theta")}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: rope_parameters={rope} is not supported (default or llama3 only)")
    codebook_size, eos = need("codebook_size"), need("audio_stream_eos_id")
    if codebook_size != eos + 1:
        raise ValueError(f"{where}: codebook_size={codebook_size} must be audio_stream_eos_id + 1 = {eos + 1} "
                         f"(the head scores the codes plus the stream BOS and EOS; the released head has 1026)")
    L, hidden, heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    return {
        "vocab_size": need("vocab_size"), "hidden_size": hidden, "intermediate_size": need("intermediate_size"),
        "num_hidden_layers": L, "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or hidden // heads,
        "rms_norm_eps": need("rms_norm_eps"), "initializer_range": raw.get("initializer_range", 0.02),
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if kind == "default" else {"rope_type": "llama3", **{k: rope[k] for k in ROPE_KEYS}},
        "audio_num_codebooks": need("num_codebooks"), "audio_codebook_size": codebook_size - 2,
        "audio_stream_bos_id": need("audio_stream_bos_id"), "audio_stream_eos_id": eos,
        # What transformers' model always is: DualFFN everywhere at the text FFN's width, delay pattern on.
        "audio_dual_ffn_layers": list(range(L)), "audio_ffn_intermediate_size": need("intermediate_size"),
        "use_delay_pattern": True,
    }
