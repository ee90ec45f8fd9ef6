"""Describe a megaflow checkpoint: iteration, layout, data position, configuration, files, and every
tensor (global shape, dtype, pieces, bytes). Reads metadata.json and config.json only.

    python tools/checkpoint/inspect_checkpoint.py --load DIR [--iteration N] [--json]
"""
import os
import sys

# Not named inspect.py: scripts run with their own folder on sys.path, where a file of that name would
# replace the standard library's inspect (which torch imports) for every tool beside it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

from megaflow.checkpoint.format import DTYPES, CheckpointReader  # noqa: E402
from megaflow.errors import naming, run_tool  # noqa: E402

_SIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def describe(root: str, iteration=None) -> dict:
    reader = CheckpointReader(root, iteration)
    meta = reader.meta
    tensors = {key: {"shape": e["shape"], "dtype": e["dtype"], "pieces": len(e["pieces"]),
                     "bytes": math.prod(e["shape"]) * _SIZES[e["dtype"]]} for key, e in reader.index.items()}
    return {"path": reader.dir, "iteration": reader.iteration, "format": meta["format"], "layout": meta["layout"],
            "consumed_samples": meta["consumed_samples"], "optimizer": meta.get("optimizer"),
            "scheduler": meta.get("scheduler"), "loss_scaler": meta.get("loss_scaler"), "rng": meta.get("rng"),
            "files": meta["files"], "config": reader.config, "tensors": tensors, "scalars": meta.get("scalars", {})}


def _mib(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ordered(keys) -> list:
    """Model tensors first, in the model's order; then each optimizer state in the same order."""
    names = [k.split("/", 1)[1] for k in keys if k.startswith("model/")]
    rank = {n: i for i, n in enumerate(names)}
    return sorted(keys, key=lambda k: (not k.startswith("model/"), k.split("/", 1)[0], rank.get(k.split("/", 1)[1], 0)))


def render(d: dict) -> str:
    lay = d["layout"]
    out = [f"{d['path']}  ({d['format']})",
           f"iteration {d['iteration']} | consumed samples {d['consumed_samples']} | layout TP={lay['tp']} "
           f"PP={lay['pp']} DP={lay['dp']} (model chunks per stage {lay['vpp']}, distributed optimizer "
           f"{'on' if lay['distributed_optimizer'] else 'off'})",
           f"optimizer {d['optimizer'] or 'none (weights only)'} | scheduler {d['scheduler']} | loss scaler "
           f"{d['loss_scaler']} | RNG {'per rank' if d['rng'] else 'none'}",
           f"files ({len(d['files'])}, {_mib(sum(d['files'].values()))}):"]
    out += [f"  {name}  {_mib(size)}" for name, size in sorted(d["files"].items())]
    out.append("config:")
    for section, values in d["config"].items():
        if isinstance(values, dict):
            out.append(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if v is not None))
        else:
            out.append(f"  {section}: {values}")
    total = sum(t["bytes"] for t in d["tensors"].values())
    out.append(f"tensors ({len(d['tensors'])}, {_mib(total)}; global shapes):")
    width = max((len(k) for k in d["tensors"]), default=0)
    for key in _ordered(d["tensors"]):
        t = d["tensors"][key]
        out.append(f"  {key:<{width}}  {str(t['shape']):<14} {t['dtype']:<9} {t['pieces']:>3} pieces  "
                   f"{_mib(t['bytes'])}")
    if d["scalars"]:
        values = sorted(set(d["scalars"].values()))
        out.append(f"scalars ({len(d['scalars'])}): values {values[:5]}{' ...' if len(values) > 5 else ''}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (holds the tracker file)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to describe (default: the latest)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    with naming("--load", args.load):
        d = describe(args.load, args.iteration)
    print(json.dumps(d, indent=1) if args.json else render(d))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
