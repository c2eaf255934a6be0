"""`python -m higgs_min.generate` on a Higgs Audio v3 model: cli.run dispatches here when the loaded model is v3
(its config's family; a v3 base folder or a run trained on a v3 preset).

    python -m higgs_min.generate --base-weights V3DIR --text "Hello there." --out a.wav --codes-out a.npy
    python -m higgs_min.generate --adapter RUN/checkpoint-N --text "..." --reference-codes ref.npy \\
        --reference-text "transcript of ref" --codes-out a.npy

The TTS prompt (v3/layout.py V3Encoder.prompt, as training lays it out), the serving sampler with the KV cache (v3/sampler.py), the codes (K, T) out.
Unlike v2: no chat template (--system, --scene, --force-audio are refused; inline tags such as
<|emotion:happy|> go in --text), no repetition-aware sampling (--ras-* refused), a reference clip may come
without its transcript (audio-only cloning, as serving allows), the codec bundled in a released v3 folder is
the default decoder (and encoder of --reference-audio), and the sampling defaults are serving's for speech
(temperature 0.8, top-k 30, top-p 0.8; stages.py SPEECH_SAMPLING_DEFAULTS).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from higgs_min.schema import DataError
from higgs_min.errors import UsageError
from higgs_min.v3.config import is_v3_config
from higgs_min.v3.layout import V3Encoder
from higgs_min.v3.sampler import DEFAULTS, V3Prompt, generate_v3
from higgs_min.v3.weights import codec_tensors

log = logging.getLogger("higgs_min.generate")

# v2-only options (cli.build_parser): their parser default is None / False so that a given one can be refused
V2_ONLY = {"system": "--system", "scene": "--scene", "force_audio": "--force-audio", "ras_win_len": "--ras-win-len",
           "ras_max_repeat": "--ras-max-repeat"}


def resolve_options(args) -> None:
    """Refuse v2-only options; fill unset sampling options with serving's defaults."""
    for name, flag in V2_ONLY.items():
        if getattr(args, name) not in (None, False):
            raise UsageError(f"{flag}: a v2 option; the v3 TTS prompt has no chat template or repetition-aware "
                             f"sampling (inline tags such as <|emotion:happy|> go in --text)")
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[name])


def default_decoder(args) -> None:
    """A wav to write (or a --reference-audio to encode), no codec chosen, and --base-weights a v3 folder that
    bundles the codec (as released: tensors under tied.embedding.modality_embeddings.0.model.*): use that codec."""
    chosen = (args.audio_tokenizer, args.codec_weights, args.random_codec_seed)
    if any(c is not None for c in chosen) or (args.out is None and args.reference_audio is None):
        return
    bundled = bundled_codec(args.base_weights)
    if bundled is not None:
        log.info("decoding with the audio codec bundled in %s", bundled)
        args.audio_tokenizer = bundled


def bundled_codec(base_weights) -> Path | None:
    """base_weights when it is a v3 folder that bundles its codec (as released), else None (also for weights
    that cannot be read: the model load reports those, naming the file)."""
    if base_weights is None or not is_v3_config(base_weights):
        return None
    try:
        return Path(base_weights) if codec_tensors(base_weights) else None
    except (OSError, ValueError):
        return None


def generate_codes(args, model, tokenizer: Path, reference: torch.Tensor | None, on_step) -> tuple[torch.Tensor, dict]:
    """-> (codes (K, T), the summary's generation fields). reference: codes (K, T) of the voice to clone, or None.
    The prompt is the training layout's (V3Encoder.prompt): what the model was fine-tuned on is what it is asked."""
    cfg = model.config
    try:
        enc = V3Encoder(tokenizer, cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
        sample = enc.prompt(args.text, None if reference is None else reference.numpy(), args.reference_text)
    except DataError as e:  # the tokenizer or the reference does not fit the model: the command as given
        raise UsageError(str(e)) from e
    g = generate_v3(model, V3Prompt.of(sample), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, on_step=on_step)
    return g.codes, {"steps": g.steps, "stopped": g.stopped, "segments": 1 if g.frames else 0, "text": "",
                     "rows": int(g.rows.shape[0])}
