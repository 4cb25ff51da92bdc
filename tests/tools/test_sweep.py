"""Sweeps: the argv a W&B agent builds from each shipped YAML parses into the trainer config, and an
offline sweep runs tiny trials from one teacher cache without loading the teacher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, ROOT, tiny_overrides
from kd.tools import sweep as ks
from kd.config import load_config
from kd.cli import parse_args

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def samples(sweep: dict) -> list[dict]:
    """Every grid point, or each continuous parameter at min, max and between."""
    if sweep["method"] == "grid":
        return ks.grid(sweep)
    out = []
    for frac in (0.0, 0.37, 1.0):
        params = {}
        for name, spec in sweep["parameters"].items():
            if "value" in spec:
                params[name] = spec["value"]
            elif "values" in spec:
                params[name] = spec["values"][int(frac * (len(spec["values"]) - 1))]
            else:
                lo, hi = spec["min"], spec["max"]
                value = lo + frac * (hi - lo)
                params[name] = value if isinstance(lo, float) else round(value)
        out.append(params)
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_wandb_agent_argv_of_each_shipped_sweep_parses_into_the_trainer_config(path, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    monkeypatch.chdir(ROOT)  # where agents are started: program and config paths are relative to it
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")  # set by the agent for each run
    sweep = ks.load_sweep(path)
    assert sweep["metric"]["name"] == "eval/ce"  # logged at eval by a cached run too
    command = [str(c) for c in sweep["command"]]
    assert command[:3] == ["${env}", "accelerate", "launch"] and "${program}" in command and "${args}" in command
    for params in samples(sweep):
        # the flags are W&B's own formatting of the run's values
        wandb_flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
        assert ks.command_args(params)["args"] == wandb_flags
        argv = ks.expand_command(sweep, params)
        assert argv[:3] == ["/usr/bin/env", "accelerate", "launch"]
        config_path, overrides = parse_args(argv[argv.index(sweep["program"]) + 1:])
        cfg = load_config(config_path, overrides)
        for key, value in params.items():
            group, leaf = key.split(".")
            assert getattr(getattr(cfg, group), leaf) == pytest.approx(value), key
        assert cfg.teacher.cache == "runs/cache/demo"
        assert cfg.train.output_dir.endswith("/abc123")  # one output_dir per trial
        assert (ROOT / sweep["program"]).is_file()


def test_unsupported_sweep_specs_are_refused(tmp_path):
    def refused(text, message):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        with pytest.raises(ks.SweepError, match=message):
            ks.load_sweep(p)

    head = "program: kd/train.py\nmetric: {name: eval/ce, goal: minimize}\n"
    refused(head + "method: hyperband\nparameters: {loss.alpha: {values: [0.1]}}\n", "method must be grid")
    refused(head + "method: bayes\nparameters: {loss.alpha: {distribution: normal, mu: 0, sigma: 1}}\n",
            "distribution 'normal' is not supported offline")
    refused(head + "method: grid\nparameters: {loss.alpha: {min: 0.0, max: 1.0}}\n", "a grid sweep needs `values`")


@pytest.mark.slow
def test_offline_sweep_runs_four_trials_from_one_cache_without_the_teacher(small_data, tmp_path):
    base = tiny_overrides(small_data, tmp_path / "unused", **{"train.export": "false", "log.tracker": "none"})
    base = [o for o in base if not o.startswith("train.output_dir=")]
    cache = tmp_path / "cache"
    # one command builds the cache (this session's KD_HOME has the teacher)
    subprocess.run([PY, "-m", "kd.cache", "--config", "configs/demo.yaml", *base, f"teacher.cache={cache}",
                    "--k", "16"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    # trials see a KD_HOME without the builtin teacher: loading it would build it there
    home = tmp_path / "home"
    env = dict(os.environ, KD_HOME=str(home))
    out = tmp_path / "sweep"
    res = subprocess.run([PY, "-m", "kd.sweep", "configs/sweeps/demo_grid.yaml", "--trials", "4", "--out", str(out),
                          *base, f"teacher.cache={cache}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 4
    assert len({tuple(t["params"].values()) for t in trials}) == 4  # four distinct grid points
    best = min(trials, key=lambda t: t["value"])
    assert summary["best"] == best["trial"]
    assert f"best trial: {best['trial']} eval/ce={best['value']:.6g}" in res.stdout
    assert not (home / "builtin" / "tiny-teacher").exists()  # no trial loaded the teacher
    for t in trials:
        log = (Path(t["output_dir"]) / "trial.log").read_text()
        assert "no teacher loaded" in log and "accelerate launch kd/train.py" in log
    from kd.tools.report import report

    pngs = report(out)
    assert [p.name for p in pngs] == ["sweep_eval_ce.png", "sweep_curves.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
