#!/usr/bin/env python
"""Draw a recorded pipeline timeline as a PNG and report its bubble beside the theory.

    torchrun --nproc-per-node 4 pretrain_gpt.py ... --pipeline-model-parallel-size 4 \
        --pipeline-timeline-dir runs/timeline            # each rank writes timeline_rank{r}.json
    python tools/pipeline_timeline.py runs/timeline --out timeline.png

One row per pipeline stage (the pipeline of TP rank 0, DP rank 0; --all-ranks for every rank): forward
bars blue, backward green (darker for later model chunks), labelled with the micro-batch; grey where a
stage is blocked in a transfer; white where it has nothing to do. Printed (and --json): the measured
bubble per stage and on average, the formula (p−1)/(v·m+p−1), and the schedule simulated with the
measured per-stage F and B times (what the schedule would give with free communication).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from megaflow.errors import run_tool  # noqa: E402
from megaflow.pipeline import timeline  # noqa: E402

FORWARD_COLOURS = [(66, 133, 244), (25, 80, 170), (120, 170, 250), (10, 50, 120)]
BACKWARD_COLOURS = [(52, 168, 83), (20, 110, 50), (130, 205, 145), (10, 70, 30)]
WAIT = (205, 205, 205)
LABEL_W, ROW_H, PAD, WIDTH = 110, 34, 8, 1500


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tick_step(span):
    for step in (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60):
        if span / step <= 12:
            return step
    return span / 10


def draw(report: dict, labels: list, path: str) -> None:
    rows, start, span = report["rows"], report["start"], report["span_seconds"]
    header = [f"PP={report['pp_size']}  V={report['virtual_pp_size']}  M={report['num_microbatches']}  "
              f"iteration {report['iteration']}  span {span * 1e3:.1f} ms",
              f"bubble: measured {report['measured']:.3f}   theory (p-1)/(v*m+p-1) {report['theory']:.3f}"
              + (f"   simulated with measured F/B times {report['simulated_with_measured_times']:.3f}"
                 if report["simulated_with_measured_times"] is not None else "")]
    top = 18 * len(header) + 2 * PAD
    height = top + ROW_H * len(rows) + 40
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    for i, line in enumerate(header):
        d.text((PAD, PAD + 18 * i), line, fill="black", font=font)
    scale = (WIDTH - LABEL_W - 2 * PAD) / span
    x_of = lambda t: LABEL_W + (t - start) * scale  # noqa: E731
    for i, (row, label) in enumerate(zip(rows, labels)):
        y0, y1 = top + i * ROW_H + 3, top + (i + 1) * ROW_H - 3
        d.text((PAD, y0 + 6), label, fill="black", font=font)
        d.line([(LABEL_W, y1 + 2), (WIDTH - PAD, y1 + 2)], fill=(235, 235, 235))
        for op, chunk, mb, t0, t1 in row:
            if t1 < start or t0 > start + span:
                continue
            x0, x1 = x_of(max(t0, start)), x_of(min(t1, start + span))
            if op == "wait":
                d.rectangle([x0, y0 + 9, max(x1, x0 + 1), y1 - 9], fill=WAIT)
                continue
            colours = FORWARD_COLOURS if op == "F" else BACKWARD_COLOURS
            d.rectangle([x0, y0, max(x1, x0 + 1), y1], fill=colours[chunk % len(colours)], outline="white")
            text = str(mb)
            if x1 - x0 > 8 * len(text) + 2:
                d.text(((x0 + x1) / 2 - 3.5 * len(text), y0 + 8), text, fill="white", font=small)
    axis_y = top + ROW_H * len(rows) + 6
    d.line([(LABEL_W, axis_y), (WIDTH - PAD, axis_y)], fill="black")
    step = _tick_step(span)
    t = 0.0
    while t <= span + 1e-12:
        x = LABEL_W + t * scale
        d.line([(x, axis_y), (x, axis_y + 5)], fill="black")
        d.text((x - 12, axis_y + 8), f"{t * 1e3:.0f} ms" if step >= 1e-3 else f"{t * 1e3:.2f}", fill="black",
               font=small)
        t += step
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory", help="the --pipeline-timeline-dir of a run")
    ap.add_argument("--out", help="PNG to write (default DIRECTORY/timeline.png)")
    ap.add_argument("--step", type=int, default=-1, help="which recorded step (default: the last)")
    ap.add_argument("--all-ranks", action="store_true", help="a row for every rank, not one pipeline")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    docs = timeline.load(args.directory, args.all_ranks)
    report = timeline.measure(docs, args.step)
    labels = [f"stage {d['pp_rank']}" + (f" (r{d['rank']})" if args.all_ranks else "") for d in docs]
    out = args.out or os.path.join(args.directory, "timeline.png")
    draw(report, labels, out)
    report.pop("rows")
    report["png"] = out
    if args.json:
        print(json.dumps(report))
    else:
        print(f"PP={report['pp_size']} V={report['virtual_pp_size']} M={report['num_microbatches']} "
              f"(iteration {report['iteration']}, span {report['span_seconds'] * 1e3:.1f} ms)")
        print("measured bubble per stage: " + "  ".join(f"{b:.3f}" for b in report["measured_per_stage"]))
        print(f"measured bubble {report['measured']:.3f} | theory (p-1)/(v*m+p-1) {report['theory']:.3f}"
              + (f" | simulated with measured F/B times {report['simulated_with_measured_times']:.3f}"
                 if report["simulated_with_measured_times"] is not None else ""))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
