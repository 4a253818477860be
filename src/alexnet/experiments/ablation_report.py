"""The ablation experiment's figure and summary.md, drawn from its summary (experiments/ablations.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alexnet.experiments.common import device_line, pct, pyplot


def plot_ablations(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = [r for r in summary["rows"] if "ten_patch_mean" not in r]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2), dpi=120)
    ys = range(len(rows))
    means = [100 * r["mean"] for r in rows]
    stds = [100 * r["std"] if math.isfinite(r["std"]) else 0.0 for r in rows]
    ax.barh(
        list(ys),
        means,
        xerr=stds,
        color=["#555555" if r["variant"] == "baseline" else "#aaaaaa" for r in rows],
        capsize=3,
    )
    for y, r in zip(ys, rows):
        for e in r["test_top1_errors"]:
            ax.plot(100 * e, y, "k.", markersize=3)
    ax.set_yticks(list(ys), [r["variant"] for r in rows])
    ax.invert_yaxis()
    if rows[0]["variant"] == "baseline":
        ax.axvline(means[0], color="#555555", linestyle=":", linewidth=0.8)
    ax.set_xlabel("test top-1 error (%), centre patch")
    ax.set_title("bars: mean over seeds, lines: std, dots: single seeds", fontsize=8)
    lo = min(100 * min(r["test_top1_errors"]) for r in rows)
    ax.set_xlim(max(0.0, lo - 5), None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ablation_markdown(s: dict[str, Any]) -> str:
    env = s["environment"]
    st = s["settings"]
    lines = [
        "# Ablations of the paper's network on CIFAR-10",
        "",
        f"Command: `{env['command']}`  ",
        device_line(env),
        (
            f"{s['training_images']:,} training images, {s['test_images']:,} test images, {st['epochs']} epochs, "
            f"batch {st['batch_size']}, width x{st['width']:g}, fc {st['fc_width']}, {st['seeds']} seed(s) per variant."
        ),
        "",
        (
            "Effect = variant's mean test top-1 error minus the baseline's (points); positive means the "
            "component helps. Reproduced = the effect exceeds twice its standard error in the paper's direction."
        ),
        "",
        "| variant | change | paper's claim | test top-1 error % (mean +- std, n) | effect (+- se) | reproduced |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        err = f"{pct(r['mean'])} +- {pct(r['std'])} (n={r['seeds']})"
        if "ten_patch_mean" in r:
            err = f"centre {pct(r['mean'])} / ten {pct(r['ten_patch_mean'])} +- {pct(r['ten_patch_std'])} (n={r['seeds']})"
        effect = "-" if "effect" not in r else f"{100 * r['effect']:+.2f} +- {pct(r['effect_se'])}"
        lines.append(f"| {r['variant']} | {r['what']} | {r['paper']} | {err} | {effect} | {r.get('reproduced', '-')} |")
    lines += ["", "Training error at the last epoch (online, with augmentation and dropout), mean over seeds:", ""]
    lines += [
        f"- {r['variant']}: {pct(r['final_train_error_mean'])}% ({r['parameters']:,} parameters)"
        for r in s["rows"]
        if "ten_patch_mean" not in r
    ]
    return "\n".join(lines) + "\n"
