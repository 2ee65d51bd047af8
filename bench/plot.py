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
            labels.append(f"cp\n({op} src L{L})")
            e2e.append(gbps(base))
            data.append(float("nan"))
            colors.append("#888888")
        naive = find(rows, op=f"naive-{op}", layers=L)
        if naive:
            labels.append(f"naive\n{op}")
            e2e.append(gbps(naive))
            data.append(float("nan"))
            colors.append("#d62728")
        for ws in s["world_sizes"]:
            r = find(rows, op=op, layers=L, ws=ws, ep=ws)
            if r:
                labels.append(f"{op}\nws{ws}")
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
    labels, vals, colors = [], [], []
    for r in rows:
        if r["op"] == "save_file" and r["samples"]:
            labels.append(r["name"].replace("save_file of the output ", "save_file\n"))
            vals.append(gbps(r))
            colors.append("#888888")
        elif r["op"] == "split_adapter" and r["samples"]:
            labels.append(r["name"].replace("split_adapter ", "split_adapter\n") + "\n(data phase)")
            vals.append(gbps(r, True))
            colors.append("#9467bd")
    if labels:
        ax.bar(range(len(labels)), vals, color=colors)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
    else:
        ax.text(0.5, 0.5, "adapters not measured", ha="center", transform=ax.transAxes)
    ax.set_ylabel("GB/s (output bytes / time)")
    ax.set_title("Adapter split vs raw save_file")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
