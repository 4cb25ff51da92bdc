"""Plots of a run or a sweep as PNG files, for people without W&B.

    python -m kd.report runs/demo                 # a run: train curves and eval curves
    python -m kd.report runs/sweeps/demo_grid     # a sweep: metric over temperature x alpha, eval curves

A run directory is one with metrics.jsonl (what kd.train writes). A sweep directory is one whose
subdirectories are runs: trials of `python -m kd.sweep` (listed in sweep.json) or the output_dirs of
a W&B sweep's trials; each trial's parameters are read from its config.yaml and its score is the
last logged value of the metric (sweep.json's metric, else --metric). PNGs go to <dir>/plots/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from kd.errors import KDError

TRAIN_KEYS = ("train/loss", "train/ce", "train/kd", "train/lr")
EVAL_KEYS = ("eval/ce", "eval/kd", "eval/loss", "eval/top1_agreement")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curves(rows: list[dict], keys, title: str, path: Path) -> Path | None:
    keys = [k for k in keys if _series(rows, k)[0]]
    if not keys:
        return None
    plt = _pyplot()
    cols = 2 if len(keys) > 1 else 1
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(5 * cols, 3.2 * -(-len(keys) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out: Path) -> list[Path]:
    """train_curves.png and (if the run evaluated) eval_curves.png."""
    rows = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [_curves(rows, TRAIN_KEYS, f"{run_dir} (train)", out / "train_curves.png"),
            _curves(rows, EVAL_KEYS, f"{run_dir} (eval)", out / "eval_curves.png")]
    return [p for p in made if p is not None]


def _config_value(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def sweep_trials(sweep_dir: Path, metric: str, x: str, y: str) -> list[dict]:
    """Every subdirectory with metrics.jsonl: its name, x and y from config.yaml, the metric's last value."""
    trials = []
    for run in sorted(p for p in Path(sweep_dir).iterdir() if (p / "metrics.jsonl").is_file()):
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        rows = read_metrics(run)
        _, values = _series(rows, metric)
        trials.append({"name": run.name, "dir": run, "rows": rows, "x": _config_value(cfg, x),
                       "y": _config_value(cfg, y), "value": values[-1] if values else None})
    return trials


def _metric_and_goal(sweep_dir: Path, metric: str | None) -> tuple[str, str]:
    info = Path(sweep_dir) / "sweep.json"
    if info.is_file():
        m = json.loads(info.read_text()).get("metric") or {}
        return metric or m.get("name", "eval/ce"), m.get("goal", "minimize")
    return metric or "eval/ce", "minimize"


def plot_sweep(sweep_dir: Path, out: Path, metric: str | None = None, x: str = "loss.temperature",
               y: str = "loss.alpha") -> list[Path]:
    """sweep_<metric>.png (heatmap when the trials lie on a grid, else a scatter) and
    sweep_curves.png (the metric over steps for every trial)."""
    metric, goal = _metric_and_goal(sweep_dir, metric)
    trials = sweep_trials(sweep_dir, metric, x, y)
    scored = [t for t in trials if t["value"] is not None and t["x"] is not None and t["y"] is not None]
    if not scored:
        raise KDError(f"{sweep_dir}: no trial has logged {metric} with {x} and {y} in its config.yaml")
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    made = []
    safe = metric.replace("/", "_")
    best = (min if goal == "minimize" else max)(scored, key=lambda t: t["value"])

    xs, ys = sorted({t["x"] for t in scored}), sorted({t["y"] for t in scored})
    on_grid = len({(t["x"], t["y"]) for t in scored}) == len(scored) and len(scored) >= 0.5 * len(xs) * len(ys)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if on_grid:
        import numpy as np

        grid = np.full((len(ys), len(xs)), np.nan)
        for t in scored:
            grid[ys.index(t["y"]), xs.index(t["x"])] = t["value"]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r" if goal == "minimize" else "viridis")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        for t in scored:
            r, g, b, _ = im.cmap(im.norm(t["value"]))
            ax.text(xs.index(t["x"]), ys.index(t["y"]), f"{t['value']:.4g}" + ("\n(best)" if t is best else ""),
                    ha="center", va="center", fontsize=8, fontweight="bold" if t is best else "normal",
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")  # readable on the cell
    else:
        im = ax.scatter([t["x"] for t in scored], [t["y"] for t in scored], c=[t["value"] for t in scored], s=60,
                        cmap="viridis_r" if goal == "minimize" else "viridis", edgecolors="k")
        ax.scatter([best["x"]], [best["y"]], s=200, facecolors="none", edgecolors="red", label="best")
        if min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log")
        ax.legend(loc="best")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{Path(sweep_dir).name}: {metric} ({goal}), best {best['name']} = {best['value']:.4g}")
    fig.tight_layout()
    fig.savefig(out / f"sweep_{safe}.png", dpi=110)
    plt.close(fig)
    made.append(out / f"sweep_{safe}.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        steps, values = _series(t["rows"], metric)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3,
                    label=f"{t['name']} {x.split('.')[-1]}={t['x']:g} {y.split('.')[-1]}={t['y']:g}"
                    if t["x"] is not None and t["y"] is not None else t["name"])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{Path(sweep_dir).name}: {metric} per trial")
    fig.tight_layout()
    fig.savefig(out / "sweep_curves.png", dpi=110)
    plt.close(fig)
    made.append(out / "sweep_curves.png")
    return made


def report(path: str | Path, out: str | Path | None = None, metric: str | None = None, x: str = "loss.temperature",
           y: str = "loss.alpha") -> list[Path]:
    """Plots for a run or a sweep directory; -> the PNG paths."""
    path = Path(path)
    if not path.is_dir():
        raise KDError(f"{path}: not a directory")
    out = Path(out) if out else path / "plots"
    if (path / "metrics.jsonl").is_file():
        return plot_run(path, out)
    if any((p / "metrics.jsonl").is_file() for p in path.iterdir() if p.is_dir()):
        return plot_sweep(path, out, metric, x, y)
    raise KDError(f"{path}: neither a run (metrics.jsonl) nor a sweep (subdirectories with metrics.jsonl)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kd.report", description="PNG plots of a run or a sweep (see kd/tools/report.py).")
    ap.add_argument("path", help="a run's output_dir or a sweep directory")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default <path>/plots)")
    ap.add_argument("--metric", default=None, help="sweep score (default: sweep.json's metric, else eval/ce)")
    ap.add_argument("--x", default="loss.temperature", help="sweep plot x axis (a config key)")
    ap.add_argument("--y", default="loss.alpha", help="sweep plot y axis (a config key)")
    args = ap.parse_args(argv)
    try:
        for p in report(args.path, args.out, args.metric, args.x, args.y):
            print(p)
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
