"""PNG figures for a report, drawn on matplotlib's Agg canvas without pyplot (no global state, no
display needed). A figure whose data the results do not hold is skipped quietly."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from atlasfl.errors import AtlasError
from atlasfl.report.records import PROTOCOLS, RunRecord, in_protocol
from atlasfl.report.stats import mean_std
from atlasfl.report.tables import MB, METRIC_SHORT, Group, group_runs

DPI = 150


def write_plots(records: list[RunRecord], out: Path, protocols: tuple[str, ...] = PROTOCOLS) -> list[Path]:
    """Every figure the records support, into `out`, the score figures once per protocol (the personal ones
    with a `_personal` suffix); returns the paths written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtlasError(f"cannot create plot folder {out} ({exc.strerror}); choose another with --plots") from None
    figures = []
    for protocol in protocols:
        groups = group_runs([v for r in records if (v := in_protocol(r, protocol)) is not None])
        for model in dict.fromkeys(g.model for g in groups):
            mine = [g for g in groups if g.model == model]
            figures += [task_curves(model, mine, out, protocol), score_vs_communication(model, mine, out, protocol)]
            figures += [client_heatmap(g, out, protocol) for g in mine]
    for r in {r.source: r for r in reversed(records)}.values():  # once per file (a sweep may give two records)
        figures += [similarity_matrix(r, out), lambda_curve(r, out)]
    return [p for p in figures if p is not None]


def _suffix(protocol: str) -> str:
    """File-name suffix: the global protocol keeps the names of reports before the personal protocol existed."""
    return "" if protocol == "global" else f"_{protocol}"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _run_title(r: RunRecord) -> str:
    return f"{r.model} {r.method_label} seed {r.seed}"


def _run_file(kind: str, r: RunRecord) -> str:
    """Unique per run in one report (a group has one run per seed), whichever folder the file came from."""
    return f"{kind}_{_slug(r.model)}_{_slug(r.method_label)}_seed{r.seed}.png"


def _per_round(g: Group, series: str) -> tuple[list[int], dict, int] | None:
    """Rounds that every run of the group has, and per key (task or client) the mean and std over runs."""
    runs = [r for r in g.runs if r.rounds]
    if not runs:
        return None
    rounds = sorted(set.intersection(*(set(r.rounds) for r in runs)))
    tables = [dict(zip(r.rounds, getattr(r, series))) for r in runs]
    keys = [k for k in dict.fromkeys(k for t in tables for rd in rounds for k in t[rd])
            if all(k in t[rd] for t in tables for rd in rounds)]
    curves = {}
    for k in keys:
        stats = [mean_std(t[rd][k] for t in tables) for rd in rounds]
        curves[k] = (np.array([s.mean for s in stats]), np.nan_to_num(np.array([s.std for s in stats])))
    return rounds, curves, len(runs)


def task_curves(model: str, groups: list[Group], out: Path, protocol: str = "global") -> Path | None:
    """Per task, each method's test metric by round: mean over seeds with a ±std band."""
    series = {g.label: c for g in groups if (c := _per_round(g, "round_task_scores"))}
    tasks = list(dict.fromkeys(t for _, curves, _ in series.values() for t in curves))
    if not tasks:
        return None
    metric = {t: r.tasks[t].metric for g in groups for r in g.runs for t in r.tasks}
    ncols = min(len(tasks), 4)
    nrows = math.ceil(len(tasks) / ncols)
    fig = _figure(3.6 * ncols, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        for label, (rounds, curves, _) in series.items():
            if task in curves:
                mean, std = curves[task]
                line, = ax.plot(rounds, mean, marker="o", label=label)
                ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(f"{task} ({METRIC_SHORT.get(metric.get(task), metric.get(task))})")
        ax.set_xlabel("round")
        ax.set_ylabel("test metric")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{model}: {protocol} test metric by round (mean ± std over seeds)")
    return _save(fig, out / f"curves_{_slug(model)}{_suffix(protocol)}.png")


def client_heatmap(g: Group, out: Path, protocol: str = "global") -> Path | None:
    """Clients × rounds of the test metric (mean over seeds), so a client that lags is visible."""
    found = _per_round(g, "round_client_scores")
    if not found or not found[1]:
        return None
    rounds, curves, n = found
    clients = sorted(curves)
    grid = np.stack([curves[c][0] for c in clients])
    tasks = g.runs[0].client_tasks
    fig = _figure(max(5.5, 2.5 + 0.55 * len(rounds)), max(3.5, 1.6 + 0.32 * len(clients)))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="test metric")
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_yticks(range(len(clients)), [f"{c} {tasks.get(c, '')}" for c in clients], fontsize="small")
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    if grid.size <= 400:
        threshold = grid.min() + 0.5 * (grid.max() - grid.min())
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > threshold else "white")
    ax.set_title(f"{g.model} {g.label}\n{protocol} test metric per client (mean of {n} seeds)", fontsize="medium")
    return _save(fig, out / f"heatmap_{_slug(g.model)}_{_slug(g.label)}{_suffix(protocol)}.png")


def score_vs_communication(model: str, groups: list[Group], out: Path, protocol: str = "global") -> Path | None:
    """Task-mean score against total traffic: one small point per seed, a large one per method mean."""
    points = {g.label: [((r.bytes_up + r.bytes_down) / MB, r.task_mean) for r in g.runs
                        if r.bytes_up is not None and r.bytes_down is not None] for g in groups}
    points = {k: v for k, v in points.items() if v}
    if not points:
        return None
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    for label, pts in points.items():
        x, y = np.array(pts).T
        dots = ax.scatter(x, y, s=18, alpha=0.5)
        ax.errorbar(x.mean(), y.mean(), yerr=y.std(ddof=1) if len(y) > 1 else None, fmt="o", markersize=9,
                    color=dots.get_facecolor()[0][:3], capsize=4, label=label)
    ax.set_xlabel("total communication, up + down (MB)")
    ax.set_ylabel(f"task-mean test score ({protocol} protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{model}: score vs communication (seeds and mean ± std)")
    return _save(fig, out / f"score_vs_comm_{_slug(model)}{_suffix(protocol)}.png")


def similarity_matrix(r: RunRecord, out: Path) -> Path | None:
    """Fingerprint similarity with clients ordered by discovered cluster, each cluster boxed."""
    c = r.clustering
    if "similarity" not in c or "labels" not in c:
        return None
    labels = np.asarray(c["labels"])
    order = np.argsort(labels, kind="stable")
    sim = np.asarray(c["similarity"], dtype=float)[np.ix_(order, order)]
    side = max(4.5, 1.8 + 0.4 * len(order))
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ticks = [f"{i} {r.client_tasks.get(int(i), '')}" for i in order]
    ax.set_xticks(range(len(order)), ticks, rotation=90, fontsize="small")
    ax.set_yticks(range(len(order)), ticks, fontsize="small")
    start = 0
    for _, size in zip(*np.unique(labels[order], return_counts=True)):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="black", linewidth=2))
        start += size
    found = ", ".join(f"{name}={c[key]:.2f}" if isinstance(c[key], float) else f"{name}={c[key]}"
                      for key, name in (("k", "k"), ("ari", "ARI")) if c.get(key) is not None)
    ax.set_title(f"{_run_title(r)}\ncentred fingerprint similarity" + (f" ({found})" if found else ""),
                 fontsize="medium")
    return _save(fig, out / _run_file("similarity", r))


def lambda_curve(r: RunRecord, out: Path) -> Path | None:
    """Validation and test score (both protocols where recorded) for every η of a --lambda-sweep, the shared
    chosen η marked."""
    sweep = r.lambda_sweep or {}
    if not all(k in sweep for k in ("grid", "val_scores", "test_scores", "selected_eta")):
        return None
    grid = np.asarray(sweep["grid"], dtype=float)
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot(grid, sweep["val_scores"], marker="o", label="local validation (selects η)")
    ax.plot(grid, sweep["test_scores"], marker="s", label="test, global protocol")
    if all(v is not None for v in sweep.get("personal_test_scores") or [None]):
        ax.plot(grid, sweep["personal_test_scores"], marker="^", label="test, personal protocol")
    ax.axvline(sweep["selected_eta"], color="gray", linestyle="--", label=f"selected η = {sweep['selected_eta']:g}")
    positive = grid[grid > 0]
    if positive.size:  # symlog: η = 0 and a log-spaced grid on one axis
        ax.set_xscale("symlog", linthresh=positive.min())
        ax.set_xlim(grid.min() - 0.5 * positive.min(), grid.max() * 1.5)
    ax.set_xlabel("η (Laplacian strength)")
    ax.set_ylabel("task-mean score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{_run_title(r)}: lambda sweep", fontsize="medium")
    return _save(fig, out / _run_file("lambda", r))
