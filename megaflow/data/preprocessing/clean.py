"""Optional document cleaning (all off by default) and exact deduplication.

Order: --strip-html, --normalize-unicode (NFKC), then the --min-chars / --max-chars filters on the
cleaned text. --dedup keeps the first document of each distinct text, compared by a 64-bit BLAKE2b
hash of the cleaned text with whitespace runs collapsed (so trailing-space variants count as equal).
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from typing import Optional

import numpy as np

_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK = re.compile(r"<\s*(br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t]+")
_WS = re.compile(r"\s+")


def strip_html(text: str) -> str:
    """Drop scripts, styles, comments and tags (block ends become newlines); unescape entities."""
    text = _COMMENT.sub("", _SCRIPT_STYLE.sub("", text))
    text = _TAG.sub("", _BLOCK.sub("\n", text))
    text = html.unescape(text)
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()


class Cleaner:
    def __init__(self, strip_html: bool = False, normalize_unicode: bool = False,
                 min_chars: Optional[int] = None, max_chars: Optional[int] = None, dedup: bool = False):
        self.html, self.nfkc, self.dedup = strip_html, normalize_unicode, dedup
        self.min_chars, self.max_chars = min_chars, max_chars

    def clean(self, text: str) -> str:
        if self.html:
            text = strip_html(text)
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        return text

    def length_verdict(self, text: str) -> Optional[str]:
        """The stat name that drops this text, or None to keep it."""
        if self.min_chars is not None and len(text) < self.min_chars:
            return "min_chars"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "max_chars"
        return None


def text_hash(text: str) -> int:
    norm = _WS.sub(" ", text).strip().encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


class HashSet:
    """A set of uint64 hashes in a numpy open-addressing table: ~16 bytes per distinct document
    (vs ~70 for a Python set), so deduplicating 100M documents needs ~1.6 GB, not ~7 GB.
    `add_new(batch)` inserts a batch and says which entries were not seen before (in batch order)."""

    _EMPTY = np.uint64(0)  # hash 0 is remapped to 1 so 0 can mark empty slots

    def __init__(self, capacity: int = 1 << 16):
        self._table = np.zeros(capacity, dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64).copy()
        hashes[hashes == 0] = 1
        _, first = np.unique(hashes, return_index=True)
        new = np.zeros(len(hashes), dtype=bool)
        new[first] = True  # later copies inside the batch are duplicates of the first
        cand = np.sort(first)
        while (self._count + len(cand)) * 2 > len(self._table):
            self._grow()
        fresh = self._insert(hashes[cand])
        new[cand[~fresh]] = False
        return new

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct keys; returns which were absent. Vectorised linear probing."""
        mask = np.uint64(len(self._table) - 1)
        slots = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11) & mask
        absent = np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        while len(todo):
            s = slots[todo]
            cur = self._table[s]
            found = cur == keys[todo]
            empty = cur == self._EMPTY
            # Among keys that want the same empty slot, the first claims it; the rest probe on.
            e_idx = todo[empty]
            _, win = np.unique(s[empty], return_index=True)
            winners = e_idx[win]
            self._table[slots[winners]] = keys[winners]
            absent[winners] = True
            self._count += len(winners)
            done = np.zeros(len(keys), dtype=bool)
            done[todo[found]] = True
            done[winners] = True
            rest = todo[~done[todo]]
            # Keys are distinct, so a slot now held by another key sends every unresolved key onward.
            slots[rest] = (slots[rest] + np.uint64(1)) & mask
            todo = rest
        return absent

    def _grow(self):
        old = self._table[self._table != self._EMPTY]
        self._table = np.zeros(len(self._table) * 2, dtype=np.uint64)
        self._count = 0
        if len(old):
            self._insert(old)
