"""From a chunk of input to documents: each line (or row) becomes {key: [text, ...]} or a reason to skip it.

Every failure here is confined to one document, so it is never raised out of the worker: the document
is skipped under one of these reasons (the summary and docs/data.md use the same labels):
"""
from __future__ import annotations

import json
import re
from typing import Dict, Iterator, List, Sequence, Tuple, Union

from megaflow.data.preprocessing.reader import Chunk

# reason -> label in the summary. Order: how the summary lists them.
ISSUE_LABELS = {
    "malformed_json": "malformed JSON",         # not JSON, or JSON that is not an object
    "control_char": "control character",        # a raw control character inside a JSON string
    "non_utf8": "non-UTF-8",                     # bytes that do not decode as UTF-8
    "invalid_unicode": "invalid Unicode",       # a lone surrogate (an unpaired \ud800-\udfff escape)
    "missing_key": "missing key",               # a --json-keys key absent or null
    "wrong_type": "wrong type",                 # a number, object, bool, or a list holding non-strings
    "too_long": "line too long",                # over --max-line-bytes
    "tokenizer_error": "tokenizer error",       # the tokenizer raised, or gave an id outside the vocabulary
    "empty": "empty",                            # no text, or no tokens after tokenization
    "error": "other error",                      # anything else that failed on this document alone
}
ISSUES = tuple(ISSUE_LABELS)

_SENT_END = re.compile(r"[.!?]+[\"')\]]*(\s+)")
_CONTROL = re.compile(r"Invalid control character")


class Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def split_sentences(text: str, keep_newlines: bool = False) -> List[str]:
    """A dependency-free sentence splitter: breaks after ., ! or ? (and closing quotes) followed by
    whitespace. With keep_newlines, newlines after a sentence stay attached to it."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.start(1)
        if keep_newlines:
            ws = m.group(1)
            end += len(ws) - len(ws.lstrip("\n"))
        s = text[start:end]
        if s.strip():
            out.append(s if keep_newlines else s.strip())
        start = m.end()
    s = text[start:]
    if s.strip():
        out.append(s if keep_newlines else s.strip())
    return out


Item = Tuple[int, Union[dict, Skip, None]]  # (offset in chunk, the record | why it is skipped | None = blank)


def records(chunk: Chunk, keys: Sequence[str], max_line_bytes: int) -> Iterator[Item]:
    """Every document of the chunk as a dict (JSON object or row), a Skip, or None for a blank line."""
    if chunk.records is not None:
        cols = [chunk.records.column(k).to_pylist() for k in keys]
        for i, values in enumerate(zip(*cols)):
            yield i, dict(zip(keys, values))
        return
    too_long = dict(chunk.too_long)
    lines = chunk.data.split(b"\n")
    if chunk.data.endswith(b"\n"):
        lines.pop()
    for i, raw in enumerate(lines):
        n = too_long.get(i, len(raw))
        if n > max_line_bytes:
            yield i, Skip("too_long", f"a line of {n:,} bytes (--max-line-bytes {max_line_bytes:,})")
        elif not raw.strip():
            yield i, None
        else:
            yield i, _parse_line(raw)


def _parse_line(raw: bytes) -> Union[dict, Skip]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip("non_utf8", f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1}")
    try:
        obj = json.loads(line)
    except ValueError as e:
        if _CONTROL.match(str(e)):
            col = getattr(e, "colno", 0)
            ch = line[e.pos] if getattr(e, "pos", None) is not None and e.pos < len(line) else "?"
            return Skip("control_char", f"raw control character {ch!r} at column {col} (JSON strings must "
                                        "escape it)")
        return Skip("malformed_json", str(e))
    except RecursionError:
        return Skip("malformed_json", "nested too deeply")
    if not isinstance(obj, dict):
        return Skip("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def texts_of(obj: dict, keys: Sequence[str], check_unicode: bool) -> Dict[str, List[str]]:
    """{key: [text, ...]} of a record; raises Skip. check_unicode: look for lone surrogates (only JSON
    escapes can make them, so callers ask only when the chunk holds a \\ud escape)."""
    doc = {}
    for k in keys:
        v = obj.get(k)
        if v is None:
            raise Skip("missing_key", f"key {k!r} is {'null' if k in obj else 'missing'}")
        if isinstance(v, str):
            doc[k] = [v]
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            doc[k] = v
        else:
            what = "a list holding non-strings" if isinstance(v, list) else f"a {_json_type(v)}"
            raise Skip("wrong_type", f"key {k!r} is {what}, not a string or a list of strings")
        if check_unicode:
            for s in doc[k]:
                _check_encodable(s, k)
    return doc


def _json_type(v) -> str:
    return {bool: "boolean", int: "number", float: "number", dict: "JSON object", bytes: "binary value"}.get(
        type(v), type(v).__name__)


def _check_encodable(s: str, key: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Skip("invalid_unicode", f"key {key!r}: lone surrogate U+{ord(s[e.start]):04X} at character "
                                      f"{e.start + 1} (an unpaired \\u{ord(s[e.start]):04x} escape)") from None
