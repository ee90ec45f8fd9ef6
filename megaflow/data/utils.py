"""Split strings and blend lists, parsed the way Megatron-Core parses them."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

SPLITS = ("train", "valid", "test")


def normalize(weights: Sequence[float]) -> List[float]:
    total = float(sum(float(w) for w in weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    return [float(w) / total for w in weights]


def parse_split(split: str) -> List[float]:
    """"969,30,1" -> normalised [train, valid, test] fractions (missing entries are 0)."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not parts or len(parts) > 3 or any(p < 0 for p in parts):
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers like 969,30,1")
    parts += [0.0] * (3 - len(parts))
    return normalize(parts)


def split_matrix(fractions: Sequence[float]) -> List[Optional[Tuple[float, float]]]:
    """[0.9, 0.1, 0.0] -> [(0, 0.9), (0.9, 1.0), None]: each split's book-ends, None when empty."""
    bounds, acc = [0.0], 0.0
    for f in fractions:
        acc += f
        bounds.append(acc)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def split_range(bookends: Tuple[float, float], n: int) -> Tuple[int, int]:
    """The [begin, end) element range a split covers in a dataset of n elements."""
    return int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))


def parse_blend(items: Optional[Sequence[str]], flag: str = "--data-path"):
    """["w1", "p1", "w2", "p2"] or ["p1", "p2"] -> (prefixes, weights or None)."""
    if not items:
        return None
    items = [str(x) for x in items]
    if len(items) % 2 == 0:
        try:
            weights = [float(items[i]) for i in range(0, len(items), 2)]
            prefixes = [items[i].strip() for i in range(1, len(items), 2)]
        except ValueError:
            weights, prefixes = None, [x.strip() for x in items]
    else:
        weights, prefixes = None, [x.strip() for x in items]
    if weights is None and any(_is_number(p) for p in prefixes):
        raise ValueError(f"{flag}: give either prefixes, or weight prefix pairs; got {items}")
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"{flag}: weights must be positive, got {weights}")
    return prefixes, weights


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
