#!/usr/bin/env python
"""Merge indexed datasets (.bin/.idx) into one, with Megatron-LM's tools/merge_datasets.py semantics.

    python tools/merge_datasets.py --input DIR --output-prefix OUT      # every prefix in DIR, sorted
    python tools/merge_datasets.py --inputs a_text_document b_text_document --output-prefix OUT

Datasets are appended in order (documents keep their boundaries, .bin bytes are concatenated); all
must share one token dtype. The output is written under temporary names and renamed when complete.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, read_header  # noqa: E402


def prefixes_in(folder):
    """Megatron's rule: every name in folder with both .bin and .idx, sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder!r} is not a directory")
    found = set()
    for name in os.listdir(folder):
        prefix, ext = os.path.splitext(name)
        if ext not in (".bin", ".idx") or not os.path.isfile(os.path.join(folder, name)):
            continue
        other = ".idx" if ext == ".bin" else ".bin"
        if not os.path.isfile(os.path.join(folder, prefix + other)):
            raise FileNotFoundError(f"--input {folder}: {name} has no matching {prefix + other}")
        found.add(os.path.join(folder, prefix))
    if not found:
        raise FileNotFoundError(f"--input {folder}: no .bin/.idx pairs")
    return sorted(found)


def merge(prefixes, output_prefix, multimodal=False):
    dtypes = {p: read_header(p + ".idx")[0] for p in prefixes}
    if len(set(dtypes.values())) > 1:
        raise ValueError("datasets with different token dtypes cannot be merged: "
                         + ", ".join(f"{p} ({d})" for p, d in dtypes.items()))
    for p in prefixes:
        IndexedDataset(p, multimodal=multimodal)  # validates each input before writing anything
    tag = f".tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin" + tag, dtypes[prefixes[0]], multimodal=multimodal)
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(output_prefix + ".idx" + tag)
    except BaseException:
        builder.abort()
        if os.path.exists(output_prefix + ".idx" + tag):
            os.remove(output_prefix + ".idx" + tag)
        raise
    os.replace(output_prefix + ".bin" + tag, output_prefix + ".bin")
    os.replace(output_prefix + ".idx" + tag, output_prefix + ".idx")
    return builder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="directory holding the .bin/.idx pairs to merge (merged in sorted order)")
    src.add_argument("--inputs", nargs="+", help="dataset prefixes to merge, in this order")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin and {prefix}.idx")
    p.add_argument("--multimodal", action="store_true", help="the datasets carry sequence modes")
    args = p.parse_args(argv)
    try:
        prefixes = prefixes_in(args.input) if args.input else args.inputs
        b = merge(prefixes, args.output_prefix, args.multimodal)
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets: {b.document_count:,} documents, {b.sequence_count:,} sequences, "
          f"{b.token_count:,} tokens -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
