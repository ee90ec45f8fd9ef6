"""Fuzzing preprocessing: no single document can stop a run.

Random and adversarial JSON lines (invalid JSON, escapes that decode to lone surrogates, raw control
characters, wrong types, non-UTF-8 bytes, text the tokenizer rejects, ids past the vocabulary, lines
far past --max-line-bytes, deep nesting, blank lines) are mixed with clean documents. Every run must
finish without a traceback, count every line exactly once (kept + skipped by reason + blank), write
outputs that megaflow's and megatron-core's readers load identically, and write exactly the bytes the
clean documents alone produce.
"""
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megaflow.data import IndexedDataset
from megaflow.data.preprocessing import cli, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 1000          # NullTokenizer: text is ids 0..999 (1000 = eod is accepted too); anything else raises
MAX_LINE = 4096


def _ids(rng, n=None):
    return " ".join(str(rng.randrange(VOCAB + 1)) for _ in range(n or rng.randint(1, 40)))


def _obj(text, **extra) -> bytes:
    return json.dumps(dict(text=text, **extra)).encode()


# Adversarial lines by the reason they must be skipped for (each a function of an rng).
ADVERSARIAL = {
    "malformed_json": [
        lambda r: b'{"text": "1 2',                            # truncated
        lambda r: b"[1, 2, 3]", lambda r: b'"just a string"', lambda r: b"null", lambda r: b"17",
        lambda r: b'{"text": "1"} trailing', lambda r: b"{'text': '1'}", lambda r: b'{"text": "\\x41"}',
        lambda r: b"[" * 1500, lambda r: b"{\"text\": " + b"[" * 1500 + b"]" * 1500 + b"}",  # deeper than the recursion limit
        lambda r: b'{"text": "1", }',
    ],
    "control_char": [
        lambda r: b'{"text": "1 \x01 2"}', lambda r: b'{"text": "3\x004"}', lambda r: b'{"text": "5\r6"}',
        lambda r: b'{"text": "7 \x1b[31m 8"}', lambda r: b'{"text": "\x0c"}',
    ],
    "non_utf8": [
        lambda r: b'{"text": "1 \xff 2"}', lambda r: b'{"text": "\xc3\x28"}',
        lambda r: b'{"text": "\xed\xa0\x80"}',                 # a surrogate encoded as UTF-8 bytes (CESU-8)
        lambda r: b'{"text": "\xc0\xaf"}',                     # an overlong encoding
        lambda r: b'\xfe\xff{"text": "1"}',
    ],
    "invalid_unicode": [
        lambda r: b'{"text": "1 \\ud800 2"}', lambda r: b'{"text": "\\udfff"}',
        lambda r: b'{"text": "3 \\udc00\\ud800"}',              # a pair in the wrong order
        lambda r: b'{"text": ["1", "2 \\uDBFF"]}',               # upper case, inside a list
        lambda r: b'{"text": "4 \\ud83d"}',                      # a high surrogate cut off at the end
    ],
    "missing_key": [lambda r: b'{"body": "1 2"}', lambda r: b'{"text": null}', lambda r: b"{}"],
    "wrong_type": [
        lambda r: b'{"text": 42}', lambda r: b'{"text": 1.5}', lambda r: b'{"text": true}',
        lambda r: b'{"text": {"a": "1"}}', lambda r: b'{"text": [1, 2]}', lambda r: b'{"text": ["1", null]}',
        lambda r: b'{"text": NaN}',
    ],
    "tokenizer_error": [
        lambda r: _obj(_ids(r) + " word"),                     # NullTokenizer raises on a non-number
        lambda r: _obj("1 2 \U0001F600"),                      # a valid pair, still not a number
        lambda r: _obj("5 1001"), lambda r: _obj("-3 4"),     # ids outside the vocabulary
        lambda r: _obj(["1 2", "x"]),
    ],
    "empty": [lambda r: _obj(""), lambda r: _obj("   \n\t "), lambda r: _obj([]), lambda r: _obj(["", " "])],
    "too_long": [
        lambda r: _obj(_ids(r, 2000)),                          # ~7 KB of clean ids, over the limit
        lambda r: b'{"text": "' + b"9 " * r.randint(3000, 40000) + b'"}',
        lambda r: b"x" * 50_000,
    ],
}
BLANK = [b"", b"   ", b"\t", b" \r"]


def _clean(rng) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        return _obj(_ids(rng))
    if kind < 0.7:
        return _obj([_ids(rng) for _ in range(rng.randint(1, 3))] + [""])   # a list: one sequence per entry
    if kind < 0.8:
        return _obj(_ids(rng), other=rng.random(), meta={"x": [1, None]})  # extra keys are ignored
    if kind < 0.9:                                      # whitespace that str.split() knows, escaped and raw
        return _obj("\u2028".join([_ids(rng, 3), _ids(rng, 2)]) + "\u00a0", ).replace(b"\\u00a0", "\u00a0".encode())
    return _obj(_ids(rng, 900))                          # long but under --max-line-bytes


def _garbage(rng) -> bytes:
    """Random bytes that cannot hold a JSON object (DEL first): malformed JSON or non-UTF-8."""
    return b"\x7f" + bytes(rng.choice([rng.randrange(256), ord("{"), ord('"'), ord("\\")])
                           for _ in range(rng.randint(0, 300))).replace(b"\n", b" ")


def _corpus(seed: int, n: int = 700):
    rng = random.Random(seed)
    reasons = sorted(ADVERSARIAL)
    lines, expected = [], []
    for _ in range(n):
        x = rng.random()
        if x < 0.45:
            lines.append(_clean(rng)), expected.append("clean")
        elif x < 0.50:
            lines.append(rng.choice(BLANK)), expected.append("blank")
        elif x < 0.55:
            lines.append(_garbage(rng)), expected.append("garbage")
        else:
            reason = rng.choice(reasons)
            lines.append(rng.choice(ADVERSARIAL[reason])(rng)), expected.append(reason)
    for reason in reasons:  # every kind at least once
        for make in ADVERSARIAL[reason]:
            pos = rng.randrange(len(lines) + 1)
            lines.insert(pos, make(rng))
            expected.insert(pos, reason)
    return lines, expected


def _write(path, lines, trailing_newline=True):
    with open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    return str(path)


def _run(inp, prefix, workers, chunk_bytes):
    args = cli.parse_args(["--input", inp, "--output-prefix", prefix, "--quiet", "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", str(VOCAB), "--append-eod", "--workers", str(workers),
                           "--chunk-bytes", str(chunk_bytes), "--max-line-bytes", str(MAX_LINE)])
    return pipeline.run(args)


def _files_equal(a, b):
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def _check_loads(prefix, n):
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    ours, theirs = IndexedDataset(prefix), MegatronIndexedDataset(prefix)
    assert len(ours) == len(theirs) and ours.num_documents == n
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs[i])
        assert ours[i].max() <= VOCAB and len(ours[i]) > 0


@pytest.fixture
def default_recursion_limit():
    """Python's default limit, which the 1,500-deep lines above exceed: an earlier test in the same
    process may have raised it (inductor sets at least 2,000), and then they parse."""
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(saved)


# workers 0 / 2; chunks smaller than --max-line-bytes (the reader skips long lines) and larger (the workers do)
@pytest.mark.parametrize("seed,workers,chunk_bytes", [(0, 0, 1024), (1, 2, 16384), (2, 2, 1024)])
def test_adversarial_corpus_is_counted_skipped_and_matches_the_clean_documents(tmp_path, seed, workers, chunk_bytes,
                                                                             default_recursion_limit):
    lines, expected = _corpus(seed)
    inp = _write(tmp_path / "fuzz.jsonl", lines, trailing_newline=seed != 2)
    stats = _run(inp, str(tmp_path / "out"), workers, chunk_bytes)

    got = {k: v for k, v in stats["dropped"].items() if v}
    want = {r: expected.count(r) for r in ADVERSARIAL}
    garbage = expected.count("garbage")
    assert got.get("malformed_json", 0) + got.get("non_utf8", 0) == \
        want["malformed_json"] + want["non_utf8"] + garbage
    for reason in set(ADVERSARIAL) - {"malformed_json", "non_utf8"}:
        assert got.get(reason, 0) == want[reason], reason
    assert stats["documents"] == expected.count("clean")
    assert stats["blank_lines"] == expected.count("blank")
    assert stats["lines"] == len(lines) == stats["documents"] + stats["skipped"] + stats["blank_lines"]

    # every example names the right line of the right file
    for reason, path, line, _ in stats["examples"]:
        assert path == inp
        assert expected[line - 1] == reason or (expected[line - 1] == "garbage"
                                                 and reason in ("malformed_json", "non_utf8")), (line, reason)

    clean = [ln for ln, e in zip(lines, expected) if e == "clean"]
    ref = _write(tmp_path / "clean.jsonl", clean)
    _run(ref, str(tmp_path / "ref"), 0, 1 << 16)
    assert _files_equal(str(tmp_path / "out_text_document"), str(tmp_path / "ref_text_document"))
    _check_loads(str(tmp_path / "out_text_document"), len(clean))


def _mutate(rng, line: bytes) -> bytes:
    b = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        pos = rng.randrange(len(b) + 1)
        if op < 0.4 and len(b):
            del b[min(pos, len(b) - 1)]
        elif op < 0.8:
            b.insert(pos, rng.choice(b'{}[]",:\\ud800 x0\x00\x01\xff\xc3'))
        else:
            b[pos:pos] = rng.choice([b"\\ud800", b"\\u0000", b'", "text": 5, "', b"\xed\xa0\x80", b"\\"])
    return bytes(b).replace(b"\n", b" ")


def _oracle_clean(line: bytes) -> bool:
    """Would a careful reader keep this line? (Python's own json, then the NullTokenizer's rules.)"""
    try:
        obj = json.loads(line.decode("utf-8"))
        v = obj["text"]
        seqs = [v] if isinstance(v, str) else v
        if not isinstance(seqs, list) or not all(isinstance(s, str) for s in seqs):
            return False
        ids = [int(x) for s in seqs for x in s.encode("utf-8").decode("utf-8").split()]
        return len(line) <= MAX_LINE and bool(ids) and all(0 <= i <= VOCAB for i in ids)
    except Exception:
        return False


def test_random_mutations_never_fail_the_run(tmp_path):
    rng = random.Random(7)
    lines = [_mutate(rng, _clean(rng)) if rng.random() < 0.7 else _clean(rng) for _ in range(1500)]
    keep = [_oracle_clean(ln) for ln in lines]
    assert 200 < sum(keep) < 1400  # a real mix
    inp = _write(tmp_path / "mut.jsonl", lines)
    stats = _run(inp, str(tmp_path / "out"), 2, 2048)
    assert stats["documents"] == sum(keep)
    assert stats["lines"] == len(lines) == stats["documents"] + stats["skipped"] + stats["blank_lines"]
    _run(_write(tmp_path / "clean.jsonl", [ln for ln, k in zip(lines, keep) if k]), str(tmp_path / "ref"), 0, 1 << 16)
    assert _files_equal(str(tmp_path / "out_text_document"), str(tmp_path / "ref_text_document"))
    _check_loads(str(tmp_path / "out_text_document"), sum(keep))


def test_command_line_reports_skips_without_a_traceback(tmp_path):
    lines, expected = _corpus(3, n=200)
    inp = _write(tmp_path / "fuzz.jsonl", lines)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", inp,
                        "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer", "--vocab-size",
                        str(VOCAB), "--workers", "2", "--max-line-bytes", str(MAX_LINE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    kept = expected.count("clean")
    assert f"{kept:,} kept" in r.stdout
    assert f"{inp}:" in r.stdout and "invalid Unicode" in r.stdout and "lone surrogate U+D" in r.stdout
    assert "line too long" in r.stdout and "tokenizer error" in r.stdout and "wrong type" in r.stdout
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == kept


def test_an_enormous_line_is_never_held_whole(tmp_path):
    """A 24 MB line with --max-line-bytes 1 MiB: the reader skips to its end holding at most ~1 MiB of it,
    reports its full length, and the lines around it are read as usual."""
    import tracemalloc
    from megaflow.data.preprocessing import reader
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "1 2"}\n{"text": "')
        for _ in range(24):
            fh.write(b"7 " * (1 << 19))
        fh.write(b'"}\n{"text": "3"}\n{"text": "4"}')
    tracemalloc.start()
    chunks = list(reader.read_chunks([str(path)], chunk_bytes=1 << 16, max_line_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 << 20
    skipped = [c for c in chunks if c.too_long]
    assert len(skipped) == 1 and skipped[0].first_line == 2 and skipped[0].too_long[0][1] == 24 * (1 << 20) + 12
    assert [c.first_line for c in chunks] == [1, 2, 3, 4]  # the last line has no newline
    stats = pipeline.run(cli.parse_args(["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--quiet",
                                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--workers", "1",
                                         "--chunk-bytes", str(1 << 16), "--max-line-bytes", str(1 << 20)]))
    assert stats["documents"] == 3 and stats["dropped"]["too_long"] == 1
    assert stats["examples"][0][2:] == (2, f"a line of {24 * (1 << 20) + 12:,} bytes (--max-line-bytes 1,048,576)")
