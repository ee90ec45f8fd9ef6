#!/usr/bin/env python
"""Write a small real-text corpus that any machine can build offline: the running Python's standard
library, as JSONL (one document per line, {"text": ...}), in a deterministic order.

    python tools/make_corpus.py --output data/stdlib.jsonl --max-mb 20

--source docstrings : every module, class and function docstring (prefixed with its dotted name)
--source code       : every stdlib .py file's source
--source both       : (default) a module's docstrings, then its source, module by module
site-packages, files that do not parse and (unless --include-tests) the test suites are skipped. The
same interpreter always gives the same bytes, so the corpus (and everything trained on it) is
reproducible.

--max-mb N writes at most N MB (2^20 bytes) and stops within 2 KB of it: a document that would pass
the limit is left out and smaller ones after it still fill the rest. When the standard library holds
less text than asked for, the tool says so, how much there is, and what would give more.
"""
import argparse
import ast
import json
import os
import sys
import sysconfig

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3"}
TEST_DIRS = {"test", "tests", "idle_test"}
FULL_WITHIN = 2048  # --max-mb counts as reached once less than this is left


def stdlib_files(root=None, include_tests=False):
    """Sorted .py files of the standard library (deterministic walk)."""
    root = root or sysconfig.get_paths()["stdlib"]
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip and not x.startswith("."))
        out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    return root, sorted(out)


def module_name(root, path):
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def docstrings(tree, module):
    """(dotted name, docstring) of the module and each class/function, in source order."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name)
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    yield from walk(tree, module)


def documents(source="both", root=None, min_chars=40, include_tests=False):
    root, files = stdlib_files(root, include_tests)
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                code = fh.read()
            tree = ast.parse(code)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = module_name(root, path)
        if source in ("docstrings", "both"):
            for name, doc in docstrings(tree, mod):
                if len(doc) >= min_chars:
                    yield f"{name}\n\n{doc}"
        if source in ("code", "both") and code.strip():
            yield code


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--output", required=True, help="the .jsonl file to write")
    p.add_argument("--source", choices=["docstrings", "code", "both"], default="both")
    p.add_argument("--max-docs", type=int, help="stop after N documents")
    p.add_argument("--max-mb", type=float, help="stop once the output reaches N MB")
    p.add_argument("--stdlib", help="a standard-library directory (default: the running interpreter's)")
    p.add_argument("--include-tests", action="store_true", help="also the stdlib's test suites (~3x more text)")
    args = p.parse_args(argv)
    if args.max_docs is not None and args.max_docs <= 0:
        p.error("--max-docs must be positive")
    if args.max_mb is not None and args.max_mb <= 0:
        p.error("--max-mb must be positive")
    limit = int(args.max_mb * (1 << 20)) if args.max_mb else None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for text in documents(args.source, args.stdlib, include_tests=args.include_tests):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            nbytes = len(line.encode("utf-8"))
            if limit and size + nbytes > limit:
                continue  # too big for what is left; a smaller document may still fit
            out.write(line)
            n += 1
            size += nbytes
            if (args.max_docs and n >= args.max_docs) or (limit and limit - size < FULL_WITHIN):
                break
    os.replace(tmp, args.output)
    print(f"wrote {n} documents, {size / (1 << 20):.2f} MB to {args.output} "
          f"(Python {sys.version.split()[0]} stdlib, source={args.source})")
    if limit and limit - size >= FULL_WITHIN and not (args.max_docs and n >= args.max_docs):
        print(shortfall(args, size), file=sys.stderr)
    return 0


def shortfall(args, size) -> str:
    """Why --max-mb was not reached, and what would reach it."""
    root = args.stdlib or sysconfig.get_paths()["stdlib"]
    more = []
    if not args.include_tests:
        more.append("--include-tests (the test suites hold about twice as much again)")
    if args.source != "both":
        more.append("--source both")
    hint = f"add {' and '.join(more)}" if more else "there is no more to add (bring a corpus of your own for more)"
    return (f"make_corpus.py: note: --max-mb {args.max_mb:g} asked for more than there is: the standard library at "
            f"{root} holds {size / (1 << 20):.2f} MB of --source {args.source} text"
            f"{'' if args.include_tests else ' without its tests'}; {hint}, or ask for less.")


if __name__ == "__main__":
    sys.exit(main())
