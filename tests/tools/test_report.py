"""kd.report renders a run's curves and a sweep's metric over temperature x alpha to PNG files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.errors import KDError
from kd.tools.report import main, report, sweep_trials

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, temperature: float, alpha: float, steps: int = 6) -> None:
    """What kd.train leaves behind: config.yaml and metrics.jsonl with train rows and two evals."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"loss:\n  alpha: {alpha}\n  temperature: {temperature}\n")
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "train/loss": 5 / s, "train/ce": 6 / s, "train/kd": 0.1 / s, "train/lr": 1e-3}
        if s % 3 == 0:
            row.update({"eval/ce": 4 + temperature / s - alpha, "eval/kd": 0.2, "eval/loss": 2.0,
                        "eval/top1_agreement": 0.1 * s})
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_curves(tmp_path, capsys):
    fake_run(tmp_path / "run", 2.0, 0.5)
    main([str(tmp_path / "run")])
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["train_curves.png", "eval_curves.png"]
    assert all(Path(p).read_bytes()[:8] == PNG for p in printed)


@pytest.mark.parametrize("points", [
    [(t, a) for t in (1.0, 2.0, 4.0) for a in (0.1, 0.5)],  # a grid: heatmap
    [(1.3, 0.2), (2.7, 0.9), (6.1, 0.4), (1.9, 0.05)],  # bayes: scatter
])
def test_sweep_plots_the_metric_over_temperature_and_alpha(tmp_path, points):
    for i, (t, a) in enumerate(points):
        fake_run(tmp_path / "sweep" / f"trial_{i:03d}", t, a)
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"metric": {"name": "eval/ce", "goal": "minimize"}}))
    pngs = report(tmp_path / "sweep")
    assert [p.name for p in pngs] == ["sweep_eval_ce.png", "sweep_curves.png"]
    assert all(p.read_bytes()[:8] == PNG and p.parent == tmp_path / "sweep" / "plots" for p in pngs)
    trials = sweep_trials(tmp_path / "sweep", "eval/ce", "loss.temperature", "loss.alpha")
    assert [(t["x"], t["y"]) for t in trials] == points
    assert [t["value"] for t in trials] == [4 + t / 6 - a for t, a in points]  # the last logged value


def test_neither_run_nor_sweep_is_an_error(tmp_path):
    with pytest.raises(KDError, match="neither a run"):
        report(tmp_path)
