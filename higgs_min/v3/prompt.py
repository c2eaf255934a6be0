"""The Higgs Audio v3 TTS prompt (no chat template, no BOS):

    <|tts|> [<|ref_text|> tok(reference transcript)] [<|ref_audio|> T_ref + K - 1 audio positions] <|text|> tok(text) <|audio|>

sglang-omni 0.1.9 text_tokenizer.py `HiggsTokenizerAdapter.build_prompt`: the special ids are the tokenizer's
added tokens looked up by name (`<|ref_text|>` is optional: older checkpoints clone from audio only); text is
encoded without special tokens and nothing is inserted between the pieces; the reference clip's positions hold
its codes in the delayed layout (utils.py `apply_delay_pattern`, = v2's data.delay_pattern with BOC and EOC),
one position per delayed row. The hidden state at `<|audio|>` predicts the first delayed row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from higgs_min.data import delay_pattern

TOKENS = {"tts": "<|tts|>", "ref_text": "<|ref_text|>", "ref_audio": "<|ref_audio|>", "text": "<|text|>",
          "audio": "<|audio|>"}
OPTIONAL = ("ref_text",)


def special_ids(tok, where: str) -> dict[str, int | None]:
    """{name: id} of the v3 special tokens, from `tok` (a tokenizers.Tokenizer)'s added tokens; a missing
    required one is an error naming `where` (the tokenizer file). An absent optional one maps to None."""
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    missing = [s for name, s in TOKENS.items() if s not in added and name not in OPTIONAL]
    if missing:
        raise ValueError(f"{where}: not a Higgs v3 tokenizer: the added tokens lack {', '.join(missing)} "
                         f"(the v3 prompt needs {', '.join(TOKENS.values())})")
    return {name: added.get(s) for name, s in TOKENS.items()}


@dataclass
class V3Prompt:
    """What generation starts from: L positions, K codebooks."""
    input_ids: torch.Tensor  # (L,) long; 0 at audio positions (ignored there)
    audio_codes: torch.Tensor  # (L, K) long: the delayed reference rows at audio positions, 0 elsewhere
    audio_mask: torch.Tensor  # (L,) bool


def build_prompt(tok, ids: dict, text: str, reference_text: str | None = None,
                 reference_codes: torch.Tensor | None = None, num_codebooks: int = 8, boc: int = 1024,
                 eoc: int = 1025) -> V3Prompt:
    """The prompt for `text`, cloning the voice of reference_codes (K, T) when given (with its transcript
    reference_text, which needs <|ref_text|> in the tokenizer: refused without it, never silently dropped)."""
    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    pieces: list[int] = [ids["tts"]]
    rows = None
    if reference_text is not None and reference_codes is None:
        raise ValueError("a reference transcript needs the reference audio (codes) it transcribes")
    if reference_codes is not None:
        if reference_codes.ndim != 2 or reference_codes.shape[0] != num_codebooks or reference_codes.shape[1] == 0:
            raise ValueError(f"reference codes of shape {list(reference_codes.shape)}: expected [{num_codebooks}, T]"
                             f" with T > 0")
        if reference_text is not None:
            if ids.get("ref_text") is None:
                raise ValueError("this tokenizer has no <|ref_text|> (an older v3 checkpoint): it clones from the "
                                 "reference audio only; drop the reference transcript")
            pieces += [ids["ref_text"]] + enc(reference_text)
        rows = delay_pattern(reference_codes.long(), boc, eoc).T  # (T + K - 1, K)
        pieces.append(ids["ref_audio"])
    start = len(pieces)
    n_audio = 0 if rows is None else rows.shape[0]
    tail = [ids["text"]] + enc(text) + [ids["audio"]]
    L = start + n_audio + len(tail)
    input_ids = torch.tensor(pieces + [0] * n_audio + tail, dtype=torch.long)
    audio_mask = torch.zeros(L, dtype=torch.bool)
    audio_mask[start:start + n_audio] = True
    audio_codes = torch.zeros(L, num_codebooks, dtype=torch.long)
    if rows is not None:
        audio_codes[start:start + n_audio] = rows
    return V3Prompt(input_ids, audio_codes, audio_mask)
