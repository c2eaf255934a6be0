"""The oracle for Higgs Audio v3: Boson's serving code itself (the sglang-omni 0.1.9 wheel), not a re-derivation.

The wheel (a test-only dependency: `pip install --no-deps sglang-omni==0.1.9`, done by `make test`) is not
imported as a package (its __init__ pulls the whole serving stack). Its self-contained files are loaded BY PATH
from sglang_omni/models/higgs_tts/: modeling.py (fused embedding and head), sampler.py (sampling, delay and stop
rules) with npu_fallback.py and reset_kernels.py, weight_loader.py (checkpoint key mapping), hf_config.py (the
config, rope_theta null -> 1e6) and text_tokenizer.py (the prompt). Three stand-ins answer the sglang imports
they make: sglang.srt.layers.sampler.multinomial_with_seed (only used by seeded batched serving: raises),
sglang_omni.platforms.current_platform (a CPU platform), sglang_omni.models.higgs_tts.utils (BOC_ID / EOC_ID,
whose real module imports the codec and the HTTP stack).

The backbone is transformers' Qwen3Model, composed as model.py HiggsTTSModel composes sglang's Qwen3 (text
embedding tied, fused head tied to the fused embedding), with the prefill input of
model_runner.build_prefill_input_embeds (-100 placeholders take the fused embedding of the delayed reference
rows), the decode input of HiggsTTSModel.decode_step_embeds_cg (the last sampled row through the fused
embedding), and RoPE tables rounded to bf16 as engine_builder.setup_model does (utils.truncate_rope_to_bf16).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PREFIX = "sglang_omni.models.higgs_tts"
# model.py `_BACKBONE_PREFIX_MAP` (model.py itself imports sglang's runtime, so its four lines are restated)
BACKBONE_PREFIX_MAP = {
    "tied.embedding.text_embedding.": "backbone.model.embed_tokens.",
    "body.layers.": "backbone.model.layers.",
    "body.norm.": "backbone.model.norm.",
    "tied.head.text_head.": "backbone.lm_head.",
}
CODEC_PREFIX = "tied.embedding.modality_embeddings.0.model."
SPECIALS = ("<|endoftext|>", "<|tts|>", "<|ref_text|>", "<|ref_audio|>", "<|text|>", "<|audio|>")  # the release's


def wheel_dir() -> Path:
    spec = importlib.util.find_spec("sglang_omni")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the sglang-omni wheel (test-only) is not installed: "
                    "`.venv/bin/python -m pip install --no-deps sglang-omni==0.1.9` (make test does it)")
    d = Path(list(spec.submodule_search_locations)[0]) / "models" / "higgs_tts"
    if not (d / "sampler.py").exists():
        pytest.fail(f"{d}: not the sglang-omni 0.1.9 layout (no sampler.py)")
    return d


def _package(name: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []  # a package, so that submodule imports resolve through sys.modules
    return m


_WHEEL: types.SimpleNamespace | None = None


def load_wheel() -> types.SimpleNamespace:
    """modeling, sampler, weight_loader, hf_config, reset_kernels, text_tokenizer: the wheel's modules."""
    global _WHEEL
    if _WHEEL is not None:
        return _WHEEL
    d = wheel_dir()

    def multinomial_with_seed(*a, **k):
        raise NotImplementedError("stand-in: seeded batched sampling is not part of the oracle")

    stand_ins = {
        "sglang": _package("sglang"), "sglang.srt": _package("sglang.srt"),
        "sglang.srt.layers": _package("sglang.srt.layers"),
        "sglang.srt.layers.sampler": types.SimpleNamespace(multinomial_with_seed=multinomial_with_seed),
        "sglang_omni": _package("sglang_omni"), "sglang_omni.models": _package("sglang_omni.models"),
        PREFIX: _package(PREFIX),
        "sglang_omni.platforms": types.SimpleNamespace(current_platform=types.SimpleNamespace(device_type="cpu")),
        f"{PREFIX}.utils": types.SimpleNamespace(BOC_ID=1024, EOC_ID=1025),  # utils.py's two constants
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    loaded = {}
    try:
        sys.modules.update(stand_ins)
        # dependency order: sampler imports reset_kernels, and npu_fallback at import time on a CPU platform
        for short in ("modeling", "reset_kernels", "npu_fallback", "sampler", "weight_loader", "hf_config",
                      "text_tokenizer"):
            name = f"{PREFIX}.{short}"
            spec = importlib.util.spec_from_file_location(name, d / f"{short}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            saved.setdefault(name, None)
            spec.loader.exec_module(mod)
            loaded[short] = mod
    finally:
        for name, old in saved.items():  # leave sys.modules as it was (a real sglang_omni stays usable)
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    _WHEEL = types.SimpleNamespace(**loaded)
    return _WHEEL


def wheel_function(relpath: str, name: str, **globals_):
    """One function of a wheel file whose module cannot be imported here (utils.py imports the codec and the HTTP
    stack): its definition is taken from the file's syntax tree and run with the given globals."""
    path = wheel_dir().parents[1] / relpath
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch, "__name__": f"oracle:{relpath}", **globals_}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def apply_delay_pattern(codes_TK: torch.Tensor) -> torch.Tensor:
    """models/higgs_tts/utils.py apply_delay_pattern: (T, K) -> (T + K - 1, K), BOC/EOC padded."""
    return wheel_function("models/higgs_tts/utils.py", "apply_delay_pattern", BOC_ID=1024, EOC_ID=1025)(codes_TK)


def reverse_delay_pattern(delayed_LK: torch.Tensor) -> torch.Tensor:
    """utils/codec_delay.py reverse_delay_pattern: (L, K) -> (L - K + 1, K)."""
    return wheel_function("utils/codec_delay.py", "reverse_delay_pattern")(delayed_LK)


# ----------------------------------------------------------------------------- a tiny released folder

def tiny_config(vocab_size: int = 64, layers: int = 2) -> dict:
    """A released-format config.json (the keys hf_config.HiggsMultimodalQwen3Config reads), tiny, rope_theta null;
    shaped like the release where it matters: 4 query heads per kv head, heads * head_dim (64) != hidden (32)."""
    return {
        "model_type": "higgs_multimodal_qwen3", "audio_token_id": -100,
        "audio_encoder_config": {"encoder_type": "discrete", "num_codebooks": 8, "vocab_size": 1026,
                                 "tie_word_embeddings": True},
        "text_config": {"model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": 32,
                        "intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": None,
                        "max_position_embeddings": 512, "hidden_act": "silu", "attention_bias": False,
                        "tie_word_embeddings": True},
    }


def released_tensors(cfg: dict, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Seeded weights under the released key names (norm weights random too, so q/k_norm are exercised),
    plus two codec tensors under the codec prefix (which neither model may read)."""
    t = cfg["text_config"]
    H, hd, nh, nkv, I = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"], \
        t["intermediate_size"]
    a = cfg["audio_encoder_config"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    out = {"tied.embedding.text_embedding.weight": rnd(t["vocab_size"], H),
           "tied.embedding.modality_embeddings.0.embedding.weight": rnd(a["num_codebooks"] * a["vocab_size"], H),
           "body.norm.weight": rnd(H, mean=1.0)}
    for i in range(t["num_hidden_layers"]):
        p = f"body.layers.{i}."
        out.update({p + "input_layernorm.weight": rnd(H, mean=1.0),
                    p + "post_attention_layernorm.weight": rnd(H, mean=1.0),
                    p + "self_attn.q_proj.weight": rnd(nh * hd, H), p + "self_attn.k_proj.weight": rnd(nkv * hd, H),
                    p + "self_attn.v_proj.weight": rnd(nkv * hd, H), p + "self_attn.o_proj.weight": rnd(H, nh * hd),
                    p + "self_attn.q_norm.weight": rnd(hd, mean=1.0), p + "self_attn.k_norm.weight": rnd(hd, mean=1.0),
                    p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
                    p + "mlp.down_proj.weight": rnd(H, I)})
    out[CODEC_PREFIX + "quantizer.codebook.weight"] = rnd(16, 4)
    out[CODEC_PREFIX + "decoder.conv.bias"] = rnd(3)
    return out


def tiny_tokenizer_json(path: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` ids whose last six are the v3 special tokens (added tokens, Qwen3's pad
    <|endoftext|> included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - len(SPECIALS))}
    words["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab={**words, "[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(path))


def write_released(folder: Path, seed: int = 0, vocab_size: int = 64, layers: int = 2, shards: int = 1) -> dict:
    """A tiny v3 folder in the released layout: config.json, safetensors (sharded when shards > 1, with the
    index), tokenizer.json. Returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(vocab_size, layers)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = released_tensors(cfg, seed)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / file))
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tiny_tokenizer_json(folder / "tokenizer.json", vocab_size)
    return tensors


def write_released_with_codec(folder: Path, tmp: Path, monkeypatch) -> Path:
    """write_released (seed 5) with the codec bundled as released: tests/audiotok_util's seeded tiny tokenizer
    (seed 3, built under `tmp`) under the v3 prefix, in place of the two stand-in codec tensors. Patches
    tokenizer_files.RELEASED to the tiny widths (so the tiny codec counts as the released architecture)."""
    from higgs_min.audio import tokenizer_files as tf
    from tests import audiotok_util as u

    monkeypatch.setattr(tf, "RELEASED", u.tiny_released(tf.RELEASED))
    _, state = u.write_released(tmp / "pth", seed=3)
    tensors = write_released(folder, seed=5)
    llm = {k: v for k, v in tensors.items() if not k.startswith(CODEC_PREFIX)}
    codec = {tf.V3_PREFIX + k: v.contiguous() for k, v in u.to_transformers(state, fold="parametrizations").items()}
    save_file({**llm, **codec}, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------- the serving model, composed

class OracleTTS(torch.nn.Module):
    """transformers' Qwen3Model + the wheel's fused embedding/head, loaded through the wheel's mapper."""

    def __init__(self, folder: Path):
        super().__init__()
        from transformers import Qwen3Model

        w = load_wheel()
        raw = json.loads((folder / "config.json").read_text())
        cfg = w.hf_config.HiggsMultimodalQwen3Config(**raw)
        text = cfg.get_text_config()
        text._attn_implementation = "eager"
        self.backbone = Qwen3Model(text)
        enc = cfg.audio_encoder_config
        K, C2 = int(enc["num_codebooks"]), int(enc["vocab_size"])
        self.embed = w.modeling.HiggsFusedMultiTextEmbedding(K, C2, text.hidden_size)
        self.head = w.modeling.HiggsFusedMultiTextHead(K, C2, text.hidden_size)
        self.head.weight = self.embed.weight  # HiggsTTSModel.__init__, tie_modality
        self.K = K
        self._round_rope_to_bf16()
        self.load(folder, w)

    def _round_rope_to_bf16(self):
        # utils.truncate_rope_to_bf16 rounds sglang's cos/sin cache to bf16; transformers computes its tables per
        # call, so the same rounding is applied to what its rotary embedding returns.
        rotary = self.backbone.rotary_emb
        plain = rotary.forward

        def rounded(x, position_ids):
            cos, sin = plain(x, position_ids)
            return cos.to(torch.bfloat16).to(cos.dtype), sin.to(torch.bfloat16).to(sin.dtype)

        rotary.forward = rounded

    @torch.no_grad()
    def load(self, folder: Path, w):
        from safetensors import safe_open

        mapper = w.weight_loader.DiscreteWeightMapper(text_prefix_map=BACKBONE_PREFIX_MAP, tie_modality=True)
        own = {"multimodal_embedding.modality_embedding_0.weight": self.embed.weight}
        params = dict(self.backbone.named_parameters())
        seen = set()
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    mapped = mapper.map(name)
                    if mapped is None:
                        continue
                    if mapped in own:
                        own[mapped].copy_(f.get_tensor(name))
                    else:
                        params[mapped.removeprefix("backbone.model.")].copy_(f.get_tensor(name))
                    seen.add(mapped)
        missing = {"multimodal_embedding.modality_embedding_0.weight"} | {"backbone.model." + n for n in params}
        assert missing == seen, f"oracle load: missing {sorted(missing - seen)[:5]}"

    def prefill_embeds(self, prompt_ids: list[int], ref_delayed: torch.Tensor | None) -> torch.Tensor:
        """model_runner.build_prefill_input_embeds for one request: (1, L, H)."""
        ids = torch.tensor(prompt_ids)
        placeholder = ids == -100
        x = self.backbone.embed_tokens(torch.where(placeholder, torch.zeros_like(ids), ids))
        if placeholder.any():
            x[placeholder] = self.embed(ref_delayed).to(x.dtype)
        return x[None]

    def hidden(self, embeds, cache=None):
        out = self.backbone(inputs_embeds=embeds, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def audio_logits(self, h_rows):  # HiggsTTSModel.decode_codebooks_batch: head in model dtype, then fp32
        return self.head.generate(h_rows).to(torch.float32)

    def text_logits(self, h_rows):  # Qwen3ForCausalLM lm_head tied to embed_tokens
        return h_rows @ self.backbone.embed_tokens.weight.T

    @torch.no_grad()
    def rollout(self, prompt_ids, ref_delayed, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The serving loop for one request with sampler.step: emitted delayed rows (R, K), cached decode."""
        from transformers import DynamicCache

        w = load_wheel()
        state = w.sampler.HiggsSamplerState(num_codebooks=self.K)
        cache = DynamicCache(config=self.backbone.config)
        h = self.hidden(self.prefill_embeds(prompt_ids, ref_delayed), cache)[0, -1:]
        rows = []
        for _ in range(max_new_tokens):
            codes = w.sampler.step(self.audio_logits(h)[0], state, **sampling)
            rows.append(codes)
            if state.generation_done:
                break
            h = self.hidden(self.embed(state.last_codes[None, None]), cache)[0, -1:]
        return torch.stack(rows)
