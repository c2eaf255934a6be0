"""The schema of a conversation, checked once: training lines, packed corpora and generation prompts.

    check_messages(messages, where, arrays) -> (texts, audio items)     raises SchemaError (a DataError)

prepare/sanitize.py:check_conversation adds the line-level checks (an object with a 'messages' list) and a
layout hint; chat.ChatEncoder.prompt and .encode call it for prompts built in code; ChatEncoder.plan trusts a
conversation that passed it.
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input, with where it is: file, line and field."""


class SchemaError(DataError):
    """A conversation that breaks the schema: the field (`messages[1].content[0].type`), a short reason
    (counted in reject reports) and the detail."""

    def __init__(self, field: str, reason: str, detail: str, where: str | None = None):
        super().__init__(f"{where + ': ' if where else ''}{field}: {detail}")
        self.field, self.reason, self.detail = field, reason, detail


def _kind(v) -> str:
    return {dict: "object", list: "list"}.get(type(v), type(v).__name__)


def check_messages(messages, where: str | None = None, arrays: bool = False) -> tuple[list, list]:
    """THE schema of a conversation's messages, for training lines, packed corpora and generation prompts
    alike (prepare/sanitize.py:check_conversation adds the line-level checks and a layout hint; the prompt
    path calls this through ChatEncoder.prompt). Returns (texts, audio items [(field, item)]).

    A message: {"role": system|user|assistant, "content": a string, or a list of items}; an item:
    {"type": "text", "text": str} or {"type": "audio", "codes": a path (or, with arrays=True, an array:
    generation prompts), "codec"?: str}. {"audio": path} items must be encoded first (prepare).
    """
    if not isinstance(messages, list) or not messages:
        raise SchemaError("messages", "empty conversation" if isinstance(messages, list) else "not a conversation",
                          "the conversation is empty" if isinstance(messages, list)
                          else f"expected a list of messages, got {_kind(messages)}", where)
    texts, audio = [], []
    for m_i, msg in enumerate(messages):
        mw = f"messages[{m_i}]"
        if not isinstance(msg, dict):
            raise SchemaError(mw, "wrong type", f"expected an object, got {_kind(msg)}", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise SchemaError(f"{mw}.role", "unknown role", f"unknown role {role!r} (expected one of {ROLES})", where)
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise SchemaError(f"{mw}.content", "wrong type", f"expected a string or a list, got {_kind(content)}",
                              where)
        for i_i, item in enumerate(content):
            iw = f"{mw}.content[{i_i}]"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise SchemaError(f"{iw}.text", "wrong type", f"expected a string, got {_kind(item.get('text'))}",
                                      where)
                texts.append(item["text"])
            elif kind == "audio":
                if "codec" in item and not isinstance(item["codec"], str):
                    raise SchemaError(f"{iw}.codec", "wrong type", "expected a string naming the audio tokenizer",
                                      where)
                if "codes" in item:
                    if not isinstance(item["codes"], (str, Path)) and not arrays:
                        raise SchemaError(f"{iw}.codes", "wrong type",
                                          f"expected a path string, got {_kind(item['codes'])}", where)
                elif "audio" in item:
                    raise SchemaError(f"{iw}.audio", "raw audio not encoded", "raw audio must be encoded first", where)
                else:
                    raise SchemaError(iw, "audio item without codes",
                                      "an audio item needs 'codes' (or 'audio', then prepare)", where)
                audio.append((iw, item))
            else:
                raise SchemaError(f"{iw}.type", "unknown item type", f"expected 'text' or 'audio', got {kind!r}"
                                  if isinstance(item, dict) else f"expected an object, got {_kind(item)}", where)
    return texts, audio
