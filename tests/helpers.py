"""Small files the tests make: a tokenizer with Llama-3-like special ids, codes, JSONL."""
import json
from pathlib import Path

import numpy as np

from higgs_min.chat import SPECIAL_TOKENS


def make_tokenizer(path: Path, special_base: int = 300) -> Path:
    """A word-level tokenizer whose special tokens sit at arbitrary high ids (as in Llama-3)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = ["hello", "world", "system", "user", "assistant", "the", "cat", "a", "b", "c", "[UNK]"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), special_base)})  # specials land at special_base + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS.values()])
    tok.save(str(path))
    return path


def write_codes(path: Path, K=4, T=5, C=16, seed=0, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, C, size=(K, T)).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, codes)
    return codes


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else
                               (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()) + b"\n"
                              for r in rows))
    return path


def conversation(codes_path="codes/a.npy", user_audio=None):
    user = "hello world" if user_audio is None else [{"type": "audio", "codes": user_audio},
                                                      {"type": "text", "text": "hello"}]
    return {"messages": [
        {"role": "system", "content": "the cat"},
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": "hello world"},
                                          {"type": "audio", "codes": codes_path}]},
    ]}
