#!/usr/bin/env python3
"""Plots the JSON lines of `clnsa bench --json F`.

usage: tools/bench_plot.py input.jsonl output.png

One subplot per (device, dtype, G, and the other shape parameters when they vary): the
median time in ms (log scale) against the sequence length T (log 2 scale), one line per
stage, dense causal attention dashed. Stages without a time (n/a) are left out. Needs
matplotlib (Debian: apt-get install python3-matplotlib).
"""
import json
import math
import sys

STAGE_ORDER = ["pool", "compressed", "topk", "selected", "window", "forward", "backward",
               "dense"]
# Shape parameters that name a subplot when they differ between records.
SHAPE_KEYS = ["device", "dtype", "G", "B", "H", "HQ", "DK", "DV", "BS", "S", "W"]


def usage(message):
    sys.stderr.write(f"bench_plot: {message}\nusage: bench_plot.py input.jsonl output.png\n")
    sys.exit(2)


def read_records(path):
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"bench_plot: {path}:{number}: not JSON: {e}")
                if not all(k in r for k in ("T", "stage", "ms_median", "dtype", "G")):
                    sys.exit(f"bench_plot: {path}:{number}: not a `clnsa bench` record")
                records.append(r)
    except OSError as e:
        sys.exit(f"bench_plot: cannot read {path}: {e.strerror}")
    return records


def color_of(stage, cmap):
    """The same color for a stage in every panel; dense is black."""
    if stage == "dense":
        return "black"
    i = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    return cmap(i % 10)


def panel_key(r, varying):
    return tuple(r.get(k) for k in varying)


def panel_title(key, varying):
    parts = []
    for k, v in zip(varying, key):
        parts.append(str(v) if k in ("device", "dtype") else f"{k}={v}")
    return ", ".join(parts)


def main(argv):
    if len(argv) != 3:
        usage("expected an input .jsonl and an output .png")
    records = read_records(argv[1])
    timed = [r for r in records
             if isinstance(r.get("ms_median"), (int, float)) and r["ms_median"] > 0]
    if not timed:
        sys.exit(f"bench_plot: {argv[1]} holds no measured time (all n/a or empty)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench_plot: matplotlib is missing (Debian/Ubuntu: "
                 "apt-get install python3-matplotlib; elsewhere: pip install matplotlib)")

    # dtype and G always name a panel; the rest only when the file mixes several values.
    varying = [k for k in SHAPE_KEYS
               if k in ("dtype", "G") or len({r.get(k) for r in timed}) > 1]
    panels = {}
    for r in timed:
        panels.setdefault(panel_key(r, varying), []).append(r)
    keys = sorted(panels, key=lambda k: tuple(str(x) for x in k))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, key in zip(axes.flat, keys):
        by_stage = {}
        for r in panels[key]:
            by_stage.setdefault(r["stage"], {})[r["T"]] = r["ms_median"]
        stages = [s for s in STAGE_ORDER if s in by_stage]
        stages += sorted(s for s in by_stage if s not in STAGE_ORDER)
        for stage in stages:
            points = sorted(by_stage[stage].items())
            ax.plot([t for t, _ in points], [ms for _, ms in points], marker="o",
                    linestyle="--" if stage == "dense" else "-",
                    color=color_of(stage, cmap), label=stage)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(panel_title(key, varying), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    # One legend for the figure, outside the panels, with every stage that appears.
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [s for s in STAGE_ORDER if s in handles] + sorted(set(handles) - set(STAGE_ORDER))
    fig.legend([handles[s] for s in order], order, loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    try:
        fig.savefig(argv[2], dpi=120)
    except OSError as e:
        sys.exit(f"bench_plot: cannot write {argv[2]}: {e.strerror}")
    print(f"bench_plot: {len(timed)} times in {len(keys)} panel(s) -> {argv[2]}")


if __name__ == "__main__":
    main(sys.argv)
