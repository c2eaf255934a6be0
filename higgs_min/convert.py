"""Other data layouts -> the project's JSONL (then `prepare` encodes the audio, then train or pack).

    python -m higgs_min.prepare convert --from ljspeech DIR  --out OUT.jsonl   (DIR/metadata.csv id|text|normalized, DIR/wavs/)
    python -m higgs_min.prepare convert --from folder DIR    --out OUT.jsonl   (a.wav beside a.txt)
    python -m higgs_min.prepare convert --from sharegpt FILE --out OUT.jsonl   ({"conversations": [{"from", "value"}]})
    python -m higgs_min.prepare convert --from openai FILE   --out OUT.jsonl   ({"messages": [...]} with input_audio)

Every output line is {"messages": [{"role", "content"}]} with audio items {"type": "audio", "audio": PATH}
(PATH relative to OUT's folder). Speech corpora (ljspeech, folder) become "say this" conversations: the user
turn is the text (with --user-prefix), the assistant turn is the audio. The role mapping (--role FROM=TO) and
the system prompt (--system) are options. A line or folder of unknown layout is an error naming the keys
found and the layouts known.
"""

from __future__ import annotations

# Known layouts: name -> how to recognize one parsed line (JSON layouts) and what it looks like.
LAYOUTS = {
    "ljspeech": "a folder with metadata.csv (id|text|normalized text) and wavs/ID.wav",
    "folder": "a folder of a.wav beside a.txt (the transcript)",
    "sharegpt": 'JSONL/JSON of {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}',
    "openai": 'JSONL of {"messages": [{"role", "content": [{"type": "text"} | {"type": "input_audio", '
              '"input_audio": {"data": BASE64, "format": "wav"}}]}]}',
}


def detect_layout(obj) -> str | None:
    """The name of the JSON layout one parsed line is in, or None (the project's own format is not detected)."""
    if not isinstance(obj, dict):
        return None
    conv = obj.get("conversations")
    if isinstance(conv, list) and any(isinstance(m, dict) and "from" in m and "value" in m for m in conv):
        return "sharegpt"
    messages = obj.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(isinstance(i, dict) and i.get("type") == "input_audio"
                                                 for i in content):
                return "openai"
    return None
