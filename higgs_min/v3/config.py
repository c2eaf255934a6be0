"""Higgs Audio v3 configuration: the released TTS 4B shape, a tiny one for CPUs, and the released config.json.

The released model (bosonai/higgs-audio-v3-tts-4b, model_type "higgs_multimodal_qwen3") is a stock Qwen3
decoder plus ONE fused audio matrix W (K * (C + 2), H) that is both the audio input embedding and the audio
head. Its config.json nests the Qwen3 fields in `text_config` and the audio fields in `audio_encoder_config`
(sglang-omni 0.1.9, sglang_omni/models/higgs_tts/hf_config.py `HiggsMultimodalQwen3Config` and
model.py `HiggsTTSModel.__init__`). `V3Config` is flat, with the field names of v2's `ModelConfig` where the
meaning is the same, so the shared pieces (`KVCache`, `Attention`, LoRA) take either.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

MODEL_TYPE = "higgs_multimodal_qwen3"
# hf_config.py `_QWEN3_ROPE_THETA`: Higgs ships `rope_theta: null`, which means Qwen3's 1e6 (not 10000).
QWEN3_ROPE_THETA = 1_000_000.0


@dataclass
class V3Config:
    # Qwen3 backbone (the released shape)
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = QWEN3_ROPE_THETA
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    # Audio: K codebooks of C codes; per codebook C + 2 classes (BOC = C, EOC = C + 1, utils.py BOC_ID / EOC_ID)
    audio_num_codebooks: int = 8
    audio_codebook_size: int = 1024

    family = "v3"  # class attribute (not a field): what checkpoints and CLIs dispatch on

    @property
    def audio_num_classes(self) -> int:
        """C + 2: the codes plus BOC and EOC (the released `audio_encoder_config.vocab_size`, 1026)."""
        return self.audio_codebook_size + 2

    @property
    def audio_boc_id(self) -> int:
        return self.audio_codebook_size

    @property
    def audio_eoc_id(self) -> int:
        return self.audio_codebook_size + 1

    def validate(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (RoPE rotates halves)")
        if self.audio_num_codebooks < 3:
            # sampler.py `step`: the wind-down after EOC lasts K - 2 steps; K <= 2 is a different rule
            problems.append(f"audio_num_codebooks={self.audio_num_codebooks}: the v3 sampler needs >= 3")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "audio_codebook_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid V3Config: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str) -> "V3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown v3 preset {name!r}; known: {sorted(PRESETS)}")
        cfg = cls(**PRESETS[name])
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------- the released config.json

    @classmethod
    def from_pretrained_config(cls, path: str | Path) -> "V3Config":
        """Read a released v3 `config.json` (a file, or a folder holding one). Anything the v3 TTS path does not
        implement (ASR encoder, untied heads, RoPE scaling, biases, sliding window) is refused, naming the field."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = read_json(path)
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path}: model_type={raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        text, audio = raw.get("text_config"), raw.get("audio_encoder_config")
        if not isinstance(text, dict) or not isinstance(audio, dict):
            raise ValueError(f"{path}: a v3 config needs the 'text_config' and 'audio_encoder_config' blocks")
        kw = {}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps"):
            if name not in text:
                raise ValueError(f"{path}: text_config.{name} is missing")
            kw[name] = text[name]
        kw["head_dim"] = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        kw["rope_theta"] = float(rope_theta(text, path))
        kw["max_position_embeddings"] = text.get("max_position_embeddings", 40960)
        kw["initializer_range"] = text.get("initializer_range", 0.02)
        refuse(path, "text_config", text, (("hidden_act", "silu"), ("attention_bias", False),
                                            ("use_sliding_window", False), ("tie_word_embeddings", True),
                                            ("model_type", "qwen3")))
        # model.py HiggsTTSModel.__init__: the discrete (TTS) encoder; out_dim defaults to hidden_size
        refuse(path, "audio_encoder_config", audio, (("encoder_type", "discrete"), ("tie_word_embeddings", True),
                                                      ("out_dim", text["hidden_size"])))
        for name in ("num_codebooks", "vocab_size"):
            if name not in audio:
                raise ValueError(f"{path}: audio_encoder_config.{name} is missing")
        kw["audio_num_codebooks"] = audio["num_codebooks"]
        kw["audio_codebook_size"] = audio["vocab_size"] - 2  # vocab_size counts BOC and EOC
        cfg = cls(**kw)
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cfg

    def released_config(self) -> dict:
        """The config.json of a folder in the released layout (what `from_pretrained_config` reads back)."""
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["HiggsMultimodalQwen3ForConditionalGeneration"],
            "audio_token_id": -100,
            "audio_encoder_config": {"encoder_type": "discrete", "num_codebooks": self.audio_num_codebooks,
                                     "vocab_size": self.audio_num_classes, "out_dim": self.hidden_size,
                                     "tie_word_embeddings": True},
            "text_config": {"model_type": "qwen3", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                            "intermediate_size": self.intermediate_size,
                            "num_hidden_layers": self.num_hidden_layers,
                            "num_attention_heads": self.num_attention_heads,
                            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                            "max_position_embeddings": self.max_position_embeddings,
                            "initializer_range": self.initializer_range, "hidden_act": "silu",
                            "attention_bias": False, "tie_word_embeddings": True},
        }


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a JSON object")
    return raw


def is_v3_config(path: str | Path) -> bool:
    """True when `path` (a folder or its config.json) holds a v3 config; False for anything else (v2, absent)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def rope_theta(text: dict, where) -> float:
    """text_config's RoPE base: `rope_theta` (null = 1e6), or transformers 5's `rope_parameters` block."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where}: text_config RoPE type {kind!r} is not supported (only plain RoPE, as released)")
    theta = text.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta")
    return QWEN3_ROPE_THETA if theta is None else theta


def refuse(path, block: str, raw: dict, fields) -> None:
    """Each (name, value we implement): a different value in `raw` is an error naming the field."""
    for name, want in fields:
        if name in raw and raw[name] is not None and raw[name] != want:
            raise ValueError(f"{path}: {block}.{name}={raw[name]!r} is not supported (higgs_min's v3 implements "
                             f"{want!r}, the released TTS model)")


PRESETS: dict[str, dict] = {
    # bosonai/higgs-audio-v3-tts-4b (meta-device shape checks: `python -m higgs_min.v3 v3-4b`, model.describe)
    "v3-4b": {},
    # CPU demo size, structure of the release. The vocabulary holds data/tokenizer.json plus the v3 special
    # tokens; the init range is v2 `tiny`'s (frozen random heads with logits large enough for LoRA to fit).
    "v3-tiny": {
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "initializer_range": 0.08,
    },
}

