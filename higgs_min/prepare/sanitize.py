"""The one exception boundary per data line: raw bytes -> Plan, or a Rejection naming file, line, field, reason.

`line_to_plan` is the only function that turns a JSONL line into a sample's Plan; the JSONL loader and the
corpus packer both call it. Whatever the line holds, it returns (never raises), except for KeyboardInterrupt
and SystemExit. Resource errors are prevented, not caught: JSON is parsed with guards (huge integer
literals, NaN/Infinity, lone surrogates), codes files are read header-first (dtype, shape and byte size are
checked against the file and against max_length before any data is read; non-regular files are refused
before opening), and a text's length is bounded from below before it is tokenized. Errors nobody foresaw
still become a rejection whose reason names the exception type.

`RejectReport` collects rejections: counts per reason, the first 20 logged, all of them written as
rejected.jsonl rows {file, line, field, reason, detail}, and the --max-bad-fraction check (0.01: a wrong codes
folder or tokenizer makes most lines bad). Lines with no supervised token (no assistant turn) or longer than
--max-length are counted skips, not bad lines; loading ends with `loaded N, skipped M (reasons…)`.

What a data line may contain (tests/fuzzgen.py decides each damaged line's outcome from these rules):
- Encoding: UTF-8. A byte-order mark at the very start of the file is accepted (utf-8-sig); anywhere else
  it is a malformed line. Blank lines are ignored (not counted).
- JSON: one object with a non-empty "messages" list. Keys the loader does not read are ignored whatever
  valid JSON they hold, except, anywhere in the line: NaN/Infinity literals (and numbers beyond a 64-bit
  float), integer literals longer than 20 characters (beyond int64/uint64), strings holding a lone UTF-16
  surrogate ("\\udc00\\ud800" is two; a valid pair such as "\\ud83d\\ude00" is a character), nesting deeper
  than the parser's recursion limit (~1,000). For duplicate keys, the last wins.
- Messages: role exactly system, user or assistant; content a string or a list of {"type": "text", "text":
  STR} / {"type": "audio", "codes": PATH[, "codec": STR]}. A line with no assistant turn is a counted skip.
- Codes files: PATH relative to the JSONL's folder, or to --audio-root; absolute paths as they are. The
  file rules are codes_file.py's.
- Length: for a byte-level BPE tokenizer (the released one) a text of n characters is at least
  n / (longest token) tokens, so a 300,000-character line is refused untokenized (0.6 ms; tokenizing it
  would take 811 ms); other tokenizers are tokenized first.
- Special-token text: a text containing `<|eot_id|>` or another special token's spelling is tokenized as
  that special token (as the released tokenizer does); clean such text beforehand.
"""

from __future__ import annotations

import json
import logging
import math
import re
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

from higgs_min import atomic
from higgs_min.prepare.codes_file import Refused, read_codes, read_codes_header
from higgs_min.chat import ChatEncoder
from higgs_min.data import Plan, Sample, materialize, plan_is_supervised
from higgs_min.schema import DataError, SchemaError, check_messages

log = logging.getLogger(__name__)

# Rejections that are counted skips even in strict mode (the line is well-formed, just not trainable here);
# they do not count towards --max-bad-fraction.
FILTERED = frozenset({"no supervised token", "longer than max length"})
MAX_INT_CHARS = 20  # an integer literal longer than this (sign included) is beyond int64/uint64: refused
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True)
class Rejection:
    """One line not used: where it is, which field, a short reason (counted) and the full detail."""
    file: str
    line: int
    field: str
    reason: str
    detail: str

    @property
    def filtered(self) -> bool:
        return self.reason in FILTERED

    def message(self) -> str:
        return f"{self.file}:{self.line}: " + (f"{self.field}: " if self.field else "") + self.detail


# ---------------------------------------------------------------------------------------------- JSON ---

def _bad_int(s: str):
    if len(s) > MAX_INT_CHARS:
        raise Refused("", "integer out of range", f"an integer literal of {len(s)} characters (at most "
                                                  f"{MAX_INT_CHARS} are read)")
    return int(s)


def _bad_float(s: str):
    v = float(s)
    if not math.isfinite(v):
        raise Refused("", "number out of range", f"the number {s[:40]} does not fit a 64-bit float")
    return v


def _bad_constant(s: str):
    raise Refused("", "NaN or Infinity", f"{s} is not JSON (NaN and Infinity literals are refused)")


def parse_json(text: str):
    """json.loads with the guards above. Raises Refused for a refused value, ValueError/RecursionError as
    json does otherwise."""
    return json.loads(text, parse_int=_bad_int, parse_float=_bad_float, parse_constant=_bad_constant)


def _lone_surrogate(obj) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None. Iterative: no recursion."""
    stack = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((where, k))
                stack.append((f"{where}.{k}" if where else str(k), x))
    return None


def parse_line(raw: bytes):
    """Bytes of one line -> the parsed JSON value, or Refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused("", "not valid UTF-8", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = parse_json(text)
    except json.JSONDecodeError as e:
        raise Refused("", "malformed JSON", f"malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise Refused("", "nested too deeply", "malformed JSON: nested deeper than the parser allows") from None
    if _SURROGATE_ESCAPE.search(raw):  # only an escaped \uD800-\uDFFF can make one; valid pairs pass below
        where = _lone_surrogate(obj)
        if where is not None:
            raise Refused(where, "lone surrogate", "a string holds a lone UTF-16 surrogate (not a character)")
    return obj


# ------------------------------------------------------------------------------------ conversation ---

def _expected(v) -> str:
    return type(v).__name__ if not isinstance(v, (dict, list)) else {dict: "object", list: "list"}[type(v)]


def check_conversation(obj, where_file: Path):
    """A line's schema, checked before any tokenizing or file reading: an object with a 'messages' list, whose
    messages pass schema.check_messages (the one schema check; a layout hint is added where the line looks like
    a layout `prepare convert` knows). Returns (messages, texts, audio items [(field, item)])."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else None
        hint = layout_hint(obj) if isinstance(obj, dict) else ""
        raise Refused("messages", "not a conversation", "expected an object with a 'messages' list"
                      + (f" (found keys {keys})" if keys is not None else f" (found {_expected(obj)})") + hint)
    try:
        texts, audio = check_messages(obj["messages"])
    except SchemaError as e:
        detail = e.detail
        if e.reason in ("unknown role", "unknown item type"):
            detail += layout_hint(obj)
        elif e.reason == "raw audio not encoded":
            detail += (f": python -m higgs_min.prepare --data {where_file} --out OUT.jsonl --audio-tokenizer DIR "
                       f"(the released Higgs audio tokenizer; --codec-weights dac.pth only to train from scratch)")
        raise Refused(e.field, e.reason, detail) from None
    return obj["messages"], texts, audio


def layout_hint(obj: dict) -> str:
    """' (this looks like X: convert it with ...)' for a line of a layout `prepare convert` knows, else ''."""
    from higgs_min.prepare.convert import detect_layout  # a leaf module: the table of known layouts lives there
    name = detect_layout(obj)
    return (f"; this looks like {name}: python -m higgs_min.prepare convert --from {name} FILE --out OUT.jsonl"
            if name else "")


_bound_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chars_per_token(encoder) -> int | None:
    """The most characters one token can cover, when every character of a text costs something: a byte-level
    BPE with no unknown token and no normalizer (the released Llama-3 tokenizer is one). None otherwise (a
    word-level tokenizer turns a word of any length into one [UNK]), and then no bound is used."""
    if encoder in _bound_cache:
        return _bound_cache[encoder]
    model = json.loads(encoder.tok.to_str())
    ok = (model.get("normalizer") is None and model["model"].get("type") == "BPE"
          and model["model"].get("unk_token") is None)
    longest = max(len(t) for t in encoder.tok.get_vocab(with_added_tokens=True))  # added tokens are one id too
    _bound_cache[encoder] = max(longest, encoder.max_token_chars) if ok else None
    return _bound_cache[encoder]


def _too_long(positions: int, max_length: int, exact: bool):
    raise Refused("", "longer than max length", f"{'' if exact else 'at least '}{positions} positions "
                                                f"> max_length {max_length}")


# --------------------------------------------------------------------------------------- the line ---

def line_to_plan(raw: bytes, line_no: int, source: Path, encoder, max_length: int,
                 audio_root: Path | None = None) -> Plan | Rejection:
    """One raw JSONL line (without its newline) -> its Plan, or a Rejection. Never raises, except
    KeyboardInterrupt / SystemExit. Codes paths are relative to `audio_root`, else to the file's folder."""
    source = Path(source)
    try:
        return _line_to_plan(raw, line_no, source, encoder, max_length, audio_root)
    except Refused as r:
        return Rejection(str(source), line_no, r.field, r.reason, r.detail)
    except DataError as e:  # the encoder's own checks (all of them are checked above first)
        where = f"{source}:{line_no}: "
        msg = str(e)[len(where):] if str(e).startswith(where) else str(e)
        field, _, detail = msg.partition(": ") if ": " in msg else ("", "", msg)
        return Rejection(str(source), line_no, field, "invalid", detail)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- the boundary: an unforeseen error names its line, no traceback
        return Rejection(str(source), line_no, "", f"unexpected {type(e).__name__}",
                         f"unexpected {type(e).__name__}: {str(e)[:300]}")


def _line_to_plan(raw, line_no, source, encoder, max_length, audio_root):
    K, C = encoder.K, encoder.C
    obj = parse_line(raw)
    messages, _, audio = check_conversation(obj, source)
    base = Path(audio_root) if audio_root is not None else source.parent
    headers = {}  # every codes file's header checked (bad files are errors even on a line skipped below)
    for iw, item in audio:
        headers[id(item)] = (iw, read_codes_header(base / item["codes"], f"{iw}.codes", K))
    if not any(m["role"] == "assistant" for m in messages):
        raise Refused("messages", "no supervised token", "no assistant text or audio to learn from")
    # A lower bound on the positions (the encoder's layout: texts at the most characters a token covers, each
    # stream's frames from its header), refused before tokenizing or reading any codes data.
    where = f"{source}:{line_no}"
    bound = encoder.min_length(messages, lambda item: headers[id(item)][1].shape[1], chars_per_token(encoder), where)
    if bound > max_length:
        _too_long(bound, max_length, False)

    def codes_of(item, _where):
        iw, h = headers[id(item)]
        return read_codes(h, f"{iw}.codes", C)

    plan = encoder.plan(messages, codes_of, where, line_no)
    n = plan.length(encoder.streams)
    if n > max_length:
        _too_long(n, max_length, True)
    if not plan_is_supervised(plan):
        raise Refused("messages", "no supervised token", "no assistant text or audio to learn from")
    return plan


# ------------------------------------------------------------------------------------------ report ---

class RejectReport:
    """Every rejection of one pass: counts per reason, the first ones logged, all written as JSONL rows."""

    def __init__(self):
        self.rows: list[Rejection] = []

    def add(self, rejection: Rejection) -> None:
        self.rows.append(rejection)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def bad(self) -> list[Rejection]:
        """The rejections that are errors (not the counted skips of FILTERED)."""
        return [r for r in self.rows if not r.filtered]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.reason] = out.get(r.reason, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.counts().items()) or "none"

    def log_first(self, n: int = 20, level: int = logging.WARNING) -> None:
        for r in self.rows[:n]:
            log.log(level, "rejected %s", r.message())
        if len(self.rows) > n:
            log.log(level, "... and %d more rejected lines", len(self.rows) - n)

    def write(self, path: Path) -> None:
        """All rows, one JSON object a line, written to a temporary name then renamed (never half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in self.rows))

    def check_fraction(self, total: int, max_frac: float) -> str | None:
        """None when the bad share is within max_frac, else the sentence saying it is not."""
        n = len(self.bad)
        if total and n / total > max_frac:
            return (f"{n} of {total} lines rejected ({100 * n / total:.2f}%) is more than --max-bad-fraction "
                    f"{max_frac:g} (a wrong codes folder or tokenizer makes most lines bad)")
        return None


def read_jsonl(path: str | Path, encoder, max_length: int, skip_bad: bool = False, audio_root: Path | None = None,
               max_bad_fraction: float = 0.01, report_path: Path | None = None) -> tuple[list[Plan], RejectReport]:
    """Every line of a JSONL file -> Plans, in one pass; then the policy.

    Strict (default): any bad line -> DataError listing the first 20 (all of them in `report_path`).
    `skip_bad`: bad lines are left out, logged (first 20 + counts) and written to `report_path`; more than
    `max_bad_fraction` of the lines bad -> DataError. FILTERED lines are counted skips in both modes.
    A byte-order mark at the start of the file is accepted.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        from higgs_min.prepare.convert import file_hint
        raise DataError(f"{path}: cannot read data file: {e.strerror or e}{file_hint(path, b'')}") from e
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    plans, report, total = [], RejectReport(), 0
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        total += 1
        out = line_to_plan(line, line_no, path, encoder, max_length, audio_root)
        (report.add if isinstance(out, Rejection) else plans.append)(out)
    if not total:
        raise DataError(f"{path}: the data file is empty")
    if report_path is not None and len(report):
        try:
            report.write(report_path)
        except OSError as e:
            raise DataError(f"{report_path}: cannot write the report of rejected lines: {e.strerror or e}") from e
    where = f" (all of them in {report_path})" if report_path is not None and len(report) else ""
    bad = report.bad
    if bad and not skip_bad:
        hint = ""
        if len(bad) == total:  # not one good line: perhaps not this project's format at all
            from higgs_min.prepare.convert import file_hint
            hint = file_hint(path, raw.split(b"\n", 1)[0])
        first = "\n  ".join(r.message() for r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{path}: {len(bad)} bad line(s) of {total}{where}; nothing was trained "
                        f"(--skip-bad-samples leaves them out){hint}:\n  {first}{more}")
    if report.rows:
        report.log_first(20)
        log.warning("%s: %d of %d lines rejected (%s)%s", path, len(report), total, report.summary(), where)
    too_many = report.check_fraction(total, max_bad_fraction) if skip_bad else None
    if too_many:
        raise DataError(f"{path}: {too_many}{where}")
    if not plans:
        raise DataError(f"{path}: no usable sample (loaded 0, skipped {len(report)} ({report.summary()}))")
    return plans, report


@dataclass
class LoadReport:
    """What loading a data file kept: samples loaded, lines skipped per reason (load_jsonl, the packed corpus)."""
    loaded: int
    skipped: dict  # reason -> count

    def summary(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) or "none"
        return f"loaded {self.loaded}, skipped {total} ({reasons})"


def load_jsonl(path: str | Path, encoder: ChatEncoder, max_length: int, skip_bad: bool = False,
               log_first: int = 0, audio_root: Path | None = None, max_bad_fraction: float = 0.01,
               report_path: Path | None = None) -> tuple[list[Sample], LoadReport]:
    """Read and encode every conversation of a JSONL file, validating all of it up front, in one pass.

    Each line goes through `line_to_plan` (the one exception boundary per line), then `materialize`.
    Strict: any bad line -> DataError listing them (all in `report_path`). `skip_bad`: bad lines are left out
    and reported; more than `max_bad_fraction` bad -> DataError. Samples with no supervised token and samples
    longer than `max_length` are always skipped and counted.
    """
    plans, rejected = read_jsonl(path, encoder, max_length, skip_bad, audio_root, max_bad_fraction,
                                          report_path)
    samples = [materialize(p, encoder.streams) for p in plans]
    for s in samples[:log_first]:
        log.info("%s", s.stats())
    report = LoadReport(len(samples), rejected.counts())
    log.info("%s: %s", path, report.summary())
    return samples, report
