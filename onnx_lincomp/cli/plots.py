"""Plots (extra ``plot``): matplotlib is imported only here, and a missing install is a usage error."""
from __future__ import annotations

from pathlib import Path

from ..errors import OptionError


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OptionError("--plot needs matplotlib: pip install 'onnx-lincomp[plot]'") from exc
    return plt


def plot_sweep(rows: list[dict], path: str, model: str) -> None:
    plt = pyplot()
    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [r["layer_params"] for r in rows], "o-", label="layer params")
    ax.plot(t, [r["skip_params"] for r in rows], "s-", label="skip params")
    ax.plot(t, [r["params"] for r in rows], "k--", label="total params")
    ax.set_xlabel("linear-rate threshold")
    ax.set_ylabel("parameters")
    if any(r["accuracy"] is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(t, [100 * (r["accuracy"] or 0) for r in rows], "r^-", label="accuracy")
        ax2.set_ylabel("held-out accuracy %", color="r")
    ax.legend(loc="center left")
    ax.set_title(Path(model).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rates(stats, path: str) -> None:
    """Per-layer distributions of sample and position activation rates."""
    plt = pyplot()
    n = max(len(stats.layers), 1)
    fig, ax = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * n + 1.5)))
    for k, (title, attr) in enumerate((("sample rate (active anywhere in a sample)", "sample_rate"),
                                       ("position rate (active positions)", "position_rate"))):
        data = [getattr(s, attr) for s in stats.layers]
        if data:
            ax[k].boxplot(data, orientation="horizontal", showfliers=True)
            ax[k].set_yticks(range(1, n + 1), [s.relu[:28] for s in stats.layers], fontsize=7)
        ax[k].set_xlim(-0.02, 1.02)
        ax[k].set_title(title)
        ax[k].axvline(0, color="red", lw=0.8, ls="--")
        ax[k].axvline(1, color="green", lw=0.8, ls="--")
    fig.suptitle(f"ReLU activation rates ({stats.source}, {stats.n_samples} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(rows: list[dict], path: str, model: str, objective: str) -> None:
    """Objective against budget used for every scored candidate, the Pareto front joined, the choice marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    inside = [r for r in rows if r["within_budget"]]
    outside = [r for r in rows if not r["within_budget"] and r["budget_used"] != float("inf")]
    ax.scatter([r["budget_used"] for r in outside], [r["objective"] for r in outside], c="0.7", label="over budget")
    ax.scatter([r["budget_used"] for r in inside], [r["objective"] for r in inside], c="tab:blue", label="within")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["budget_used"])
    ax.plot([r["budget_used"] for r in front], [r["objective"] for r in front], "b--", lw=1, label="Pareto front")
    for r in rows:
        if r["chosen"]:
            ax.scatter([r["budget_used"]], [r["objective"]], s=160, facecolors="none", edgecolors="r", label="chosen")
    ax.set_xlabel("budget used")
    ax.set_ylabel({"latency": "batch-1 latency ratio", "size": "file bytes", "macs": "MACs"}.get(objective, objective))
    ax.legend()
    ax.set_title(Path(model).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(scan, path: str) -> None:
    """One line per layer: the scan's figure (accuracy, agreement or output error) against the pruning level."""
    plt = pyplot()
    field, heading = scan.figure
    scale = 100.0 if field in ("accuracy", "agreement") else 1.0
    fig, ax = plt.subplots(figsize=(8, 5))
    for layer in scan.layers:
        rows = scan.curve(layer)
        ax.plot([r.level for r in rows], [scale * (getattr(r, field) or 0.0) for r in rows], "o-", ms=3, lw=1,
                label=layer)
    ax.set_xlabel("pruning level")
    ax.set_ylabel(heading)
    if len(scan.layers) <= 30:
        ax.legend(fontsize=6, ncol=2 if len(scan.layers) > 12 else 1, loc="best")
    ax.set_title(f"{Path(scan.model).name}: one {scan.unit} pruned at a time ({scan.pass_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
