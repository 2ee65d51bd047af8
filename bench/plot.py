"""The benchmark's plot: throughput against the baselines, and peak memory per rank against naive.

Needs matplotlib (the optional extra `bench`: `pip install -e .[bench]`); without it no plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import cp_row, find, gbps, max_rank_rss

GiB = 2**30


def plot_results(results: dict[str, Any], path: Path) -> str | None:
    """Draw `results` (as bench.run produces them) into the PNG `path`; returns its file name, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, s = results["rows"], results["settings"]
    Ls = sorted(s["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    ax = axes[0]
    labels, e2e, data, colors = [], [], [], []
    for op in ("fuse", "split"):
        L = max([x for x in Ls if find(rows, op=op, layers=x)], default=None)
        if L is None:
            continue
        tool = find(rows, op=op, layers=L)
        base = cp_row(rows, tool) if tool else None
        if base:
            labels.append(f"cp -r\nL{L}")
            e2e.append(gbps(base))
            data.append(float("nan"))
            colors.append("#888888")
        naive = find(rows, op=f"naive-{op}", layers=L)
        if naive:
            labels.append(f"naive\n{op} L{L}")
            e2e.append(gbps(naive))
            data.append(float("nan"))
            colors.append("#d62728")
        for ws in s["world_sizes"]:
            r = find(rows, op=op, layers=L, ws=ws, ep=ws)
            if r:
                labels.append(f"{op} L{L}\nws{ws}")
                e2e.append(gbps(r))
                data.append(gbps(r, True))
                colors.append("#1f77b4" if op == "fuse" else "#2ca02c")
    x = list(range(len(labels)))
    ax.bar([i - 0.2 for i in x], e2e, 0.4, color=colors, label="whole command")
    ax.bar([i + 0.2 for i in x], data, 0.4, color=colors, alpha=0.5, hatch="//", label="data phase")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("GB/s (output bytes / time)")
    ax.set_title("Throughput: tool vs cp -r vs naive")
    ax.legend(fontsize=8)

    ax = axes[1]
    for ws in s["world_sizes"]:
        pts = [(find(rows, op="fuse", layers=L, ws=ws, ep=ws), L) for L in Ls]
        pts = [(r["nbytes"] / 1e9, max_rank_rss(r) / GiB) for r, _ in pts if r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"tool fuse, ws{ws} (largest rank)")
    pts = [(r["nbytes"] / 1e9, max(r["peak_rss"]) / GiB) for r in rows if r["op"] == "naive-fuse" and r["samples"]]
    if pts:
        ax.plot(*zip(*sorted(pts)), marker="s", color="#d62728", label="naive fuse")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint GB")
    ax.set_ylabel("peak RSS per process, GiB (log)")
    ax.set_title("Peak memory as the checkpoint grows")
    ax.legend(fontsize=8)

    ax = axes[2]
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if not r["samples"]:
            continue
        if r["op"] == "save_file":
            name = r["name"].split("(", 1)[1].rstrip(")")
            groups.setdefault(name, {})["save_file"] = gbps(r)
        elif r["op"].startswith("split_adapter"):
            name = r["name"].split(" ", 1)[1].split(" ws", 1)[0]
            label = f"ws{r['ws']}" + (", cached" if r["op"].endswith("warm") else ", cold")
            groups.setdefault(name, {})[label] = gbps(r, True)
    if groups:
        colors = {"save_file": "#888888", "ws1, cold": "#9467bd", "ws1, cached": "#c5b0d5", "ws2, cold": "#8c564b"}
        labels = sorted({k for g in groups.values() for k in g}, key=lambda k: list(colors).index(k) if k in colors else 9)
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs = [i + j * width for i in range(len(groups))]
            ax.bar(xs, [g.get(label, float("nan")) for g in groups.values()], width,
                   color=colors.get(label, "#17becf"), label="save_file" if label == "save_file" else f"split_adapter {label}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups), fontsize=8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "adapters not measured", ha="center", transform=ax.transAxes)
    ax.set_ylabel("GB/s (output bytes / data phase or save_file time)")
    ax.set_title("Adapter split vs raw save_file")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
