"""Rebuild the shipped demo set: data/demo.jsonl, data/codes/, data/tokenizer.json, data/tokenizer_v3.json.

    apt-get install espeak-ng   # only needed to rebuild; training and CI use the outputs
    .venv/bin/python data/make_demo.py
    .venv/bin/python data/make_demo.py --v3-tokenizer   # only data/tokenizer_v3.json (no espeak-ng needed)

Speech is synthesized by espeak-ng (English and Arabic voices) and encoded by a
seeded random DAC (higgs_min.audio.codec.RANDOM_CODEC_CONFIG): the released codec
weights cannot be fetched here. The tokenizer is a byte-level BPE trained on the
demo text, plus the Llama-3 / Higgs special tokens by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from higgs_min.chat import SPECIAL_TOKENS  # noqa: E402
from higgs_min.prepare.encode import prepare  # noqa: E402

SYSTEM = "You are a helpful voice assistant. Answer in the language of the question."
PAIRS = [
    ("en", "What is the capital of France?", "The capital of France is Paris."),
    ("en", "How many days are in a week?", "A week has seven days."),
    ("en", "What color is the sky?", "The sky is blue on a clear day."),
    ("en", "Say good morning.", "Good morning to you."),
    ("en", "What do bees make?", "Bees make honey."),
    ("en", "Where does the sun rise?", "The sun rises in the east."),
    ("en", "What is two plus two?", "Two plus two is four."),
    ("en", "Name a fruit.", "An apple is a fruit."),
    ("en", "What do cats say?", "Cats say meow."),
    ("en", "How are you?", "I am well, thank you."),
    ("en", "What season is cold?", "Winter is the cold season."),
    ("en", "What do we drink?", "We drink water every day."),
    ("en", "Tell me a number.", "Seven is a number."),
    ("en", "What is ice?", "Ice is frozen water."),
    ("en", "Thank you.", "You are welcome."),
    ("en", "Goodbye.", "Goodbye, see you soon."),
    ("ar", "ما هي عاصمة مصر؟", "عاصمة مصر هي القاهرة."),
    ("ar", "كم يوما في الأسبوع؟", "في الأسبوع سبعة أيام."),
    ("ar", "ما لون السماء؟", "السماء زرقاء."),
    ("ar", "قل صباح الخير.", "صباح الخير لك."),
    ("ar", "ماذا يصنع النحل؟", "النحل يصنع العسل."),
    ("ar", "من أين تشرق الشمس؟", "تشرق الشمس من الشرق."),
    ("ar", "كم اثنان زائد اثنين؟", "اثنان زائد اثنين أربعة."),
    ("ar", "اذكر فاكهة.", "التفاح فاكهة."),
    ("ar", "كيف حالك؟", "أنا بخير، شكرا."),
    ("ar", "ما هو الثلج؟", "الثلج ماء متجمد."),
    ("ar", "ماذا نشرب؟", "نشرب الماء كل يوم."),
    ("ar", "شكرا لك.", "عفوا."),
    ("ar", "مع السلامة.", "مع السلامة، أراك قريبا."),
    ("ar", "ما اسمك؟", "أنا مساعد صوتي."),
    ("ar", "هل تتكلم العربية؟", "نعم، أتكلم العربية."),
    ("en", "Do you speak English?", "Yes, I speak English."),
]
# These conversations give the question as user speech too (reference audio in).
SPOKEN_QUESTION = {3, 9, 19, 24}


# Higgs Audio v3's special tokens, in the released tokenizer's id order (<|endoftext|> 151643 is Qwen3's pad,
# <|tts|> 151667, <|audio|> 151670, <|text|> 151672, <|ref_audio|> 151679, <|ref_text|> 151680).
V3_SPECIALS = ["<|endoftext|>", "<|tts|>", "<|audio|>", "<|text|>", "<|ref_audio|>", "<|ref_text|>"]


def speak(text: str, voice: str, wav: Path) -> None:
    subprocess.run(["espeak-ng", "-v", voice, "-s", "190", "-w", str(wav), text], check=True)


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))


def main() -> None:
    work = HERE / "_build"
    shutil.rmtree(work, ignore_errors=True)
    (work / "wav").mkdir(parents=True)
    rows = []
    for i, (lang, q, a) in enumerate(PAIRS):
        voice = "en" if lang == "en" else "ar"
        speak(a, voice, work / "wav" / f"a{i:02d}.wav")
        user = q
        if i in SPOKEN_QUESTION:
            speak(q, voice, work / "wav" / f"q{i:02d}.wav")
            user = [{"type": "audio", "audio": f"wav/q{i:02d}.wav"}, {"type": "text", "text": q}]
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": a},
                                              {"type": "audio", "audio": f"wav/a{i:02d}.wav"}]},
        ]})
    raw = work / "raw.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    shutil.rmtree(HERE / "codes", ignore_errors=True)
    prepare(raw, HERE / "demo.jsonl", random_seed=0)
    # The wavs are not shipped: drop the pointers to them.
    lines = [json.loads(line) for line in (HERE / "demo.jsonl").read_text(encoding="utf-8").splitlines()]
    for conv in lines:
        for msg in conv["messages"]:
            for item in msg["content"] if isinstance(msg["content"], list) else []:
                item.pop("source_audio", None)
    (HERE / "demo.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in lines), encoding="utf-8")
    texts = [SYSTEM] + [t for _, q, a in PAIRS for t in (q, a)] + ["system", "user", "assistant", "\n\n"]
    train_tokenizer(texts, HERE / "tokenizer.json")
    v3_tokenizer(HERE / "tokenizer.json", HERE / "tokenizer_v3.json")
    shutil.rmtree(work)
    print(f"wrote {HERE / 'demo.jsonl'} ({len(rows)} conversations), {HERE / 'codes'}, {HERE / 'tokenizer.json'}, "
          f"{HERE / 'tokenizer_v3.json'}")


def v3_tokenizer(src: Path, out: Path) -> None:
    """The v3 demo tokenizer (preset v3-tiny): the same BPE and ids as `src`, plus the v3 special tokens as added
    tokens (ids 705-710 here), as the released v3 tokenizer holds them. A shipped file, not tokens added at
    load time: a tokenizer without them must be refused, never silently extended."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in V3_SPECIALS])
    tok.save(str(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["--v3-tokenizer"]:  # only data/tokenizer_v3.json, from the shipped tokenizer.json
        v3_tokenizer(HERE / "tokenizer.json", HERE / "tokenizer_v3.json")
    else:
        main()
