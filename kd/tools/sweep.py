"""Offline sweep driver: run a W&B sweep YAML without a W&B server (air-gapped clusters).

    python -m kd.sweep configs/sweeps/demo_grid.yaml --trials 4 [--out runs/sweeps/demo_grid] [overrides]

Each trial is the command a W&B agent would run for the same YAML (`${env}`, `${program}`,
`${args}`, ... expanded the way the agent expands them), started as a subprocess with
`--train.output_dir=<out>/trial_NNN` and any extra overrides appended (so they win over the sweep's
values). The score is the last value of the sweep's `metric.name` in the trial's metrics.jsonl
(what W&B's run summary holds). The search is Optuna's: `grid` -> GridSampler, `random` ->
RandomSampler, `bayes` -> TPESampler (W&B's bayes is a Gaussian process: same space and metric,
another algorithm). Studies live in <out>/optuna.journal: a rerun adds trials to the same study,
and several drivers may share one --out (Optuna's journal file is lock-protected), e.g. one per
Slurm array element. <out>/sweep.json holds every trial's parameters and score (kd.report reads it).
Trials get WANDB_MODE=offline unless it is set (no server to reach); pass `log.tracker=none` to
skip W&B entirely. Run it from the repository root, as an agent would be.

Supported parameter specs (W&B syntax): `value`, `values`, `min`/`max` (int_uniform when both are
ints, else uniform), and `distribution` in uniform, int_uniform, q_uniform, log_uniform_values,
categorical. Anything else is refused with one line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kd.errors import KDError

_DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
_KEYS = {"program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
         "early_terminate", "run_cap"}
_DISTRIBUTIONS = ("uniform", "int_uniform", "q_uniform", "log_uniform_values", "categorical")


class SweepError(KDError):
    """A sweep YAML this driver cannot run faithfully."""


# --------------------------------------------------------------------------- the YAML


def load_sweep(path: str | Path) -> dict:
    """Read and check a W&B sweep YAML; -> the dict, with parameters normalised to a kind each."""
    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"cannot read sweep {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: a sweep is a mapping with program, method, metric, parameters")
    unknown = sorted(set(sweep) - _KEYS)
    if unknown:
        raise SweepError(f"{path}: unsupported sweep key(s) {', '.join(unknown)}")
    if sweep.get("method") not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: method must be grid, random or bayes, got {sweep.get('method')!r}")
    metric = sweep.get("metric") or {}
    if not metric.get("name") or metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise SweepError(f"{path}: metric needs a name and goal minimize or maximize")
    if not sweep.get("program"):
        raise SweepError(f"{path}: no program")
    params = sweep.get("parameters") or {}
    if not params:
        raise SweepError(f"{path}: no parameters")
    for name, spec in params.items():
        _kind(path, name, spec, sweep["method"])
    return sweep


def _kind(path, name: str, spec, method: str) -> str:
    """fixed | categorical | uniform | int_uniform | q_uniform | log_uniform_values (or raise)."""
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: parameter {name} must be a mapping")
    if "parameters" in spec:
        raise SweepError(f"{path}: parameter {name}: nested parameters are not supported offline")
    if "value" in spec:
        return "fixed"
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise SweepError(f"{path}: parameter {name}: values must be a non-empty list")
        return "categorical"
    dist = spec.get("distribution")
    if dist is None and "min" in spec and "max" in spec:
        dist = "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
    if dist not in _DISTRIBUTIONS or dist == "categorical":
        raise SweepError(f"{path}: parameter {name}: distribution {dist!r} is not supported offline "
                         f"(use value, values, or one of {', '.join(_DISTRIBUTIONS[:-1])})")
    if method == "grid":
        raise SweepError(f"{path}: parameter {name}: a grid sweep needs `values` (or `value`)")
    return dist


def grid(sweep: dict) -> list[dict]:
    """Every combination of a grid sweep's values (fixed values included), in YAML order."""
    params = sweep["parameters"]
    names = list(params)
    axes = [[params[n]["value"]] if "value" in params[n] else params[n]["values"] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*axes)]


# --------------------------------------------------------------------------- argv like a W&B agent


def command_args(params: dict) -> dict[str, list[str]]:
    """The agent's argument macros for one trial's values (formatted as W&B formats them)."""
    flags = [f"--{k}={v}" for k, v in params.items()]
    return {
        "args": flags,
        "args_no_hyphens": [f[2:] for f in flags],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
        "args_no_equals": [x for k, v in params.items() for x in (f"--{k}", str(v))],
    }


def expand_command(sweep: dict, params: dict, interpreter: str = "python") -> list[str]:
    """The argv a W&B agent builds: each `${macro}` item replaced by its list, others verbatim."""
    macros = {**command_args(params), "env": ["/usr/bin/env"], "interpreter": [interpreter],
              "program": [str(sweep["program"])]}
    argv = []
    for item in sweep.get("command") or _DEFAULT_COMMAND:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            if item[2:-1] not in macros:
                raise SweepError(f"sweep command macro {item} is not supported offline")
            argv += macros[item[2:-1]]
        else:
            argv.append(item)
    return argv


# --------------------------------------------------------------------------- running


def _suggest(trial, name: str, spec: dict):
    kind = _kind("sweep", name, spec, "bayes")
    if kind == "fixed":
        return spec["value"]
    if kind == "categorical":
        return trial.suggest_categorical(name, spec["values"])
    lo, hi = spec["min"], spec["max"]
    if kind == "int_uniform":
        return trial.suggest_int(name, int(lo), int(hi))
    if kind == "q_uniform":
        return trial.suggest_float(name, float(lo), float(hi), step=float(spec.get("q", 1.0)))
    return trial.suggest_float(name, float(lo), float(hi), log=kind == "log_uniform_values")


def _sampler(sweep: dict, seed: int):
    import optuna

    if sweep["method"] == "grid":
        space = {n: s["values"] for n, s in sweep["parameters"].items() if "values" in s}
        return optuna.samplers.GridSampler(space, seed=seed)
    if sweep["method"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def last_metric(run_dir: Path, name: str) -> float | None:
    """The last logged value of `name` in run_dir/metrics.jsonl (W&B's summary value)."""
    value = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        row = json.loads(line) if line.strip() else {}
        if name in row:
            value = float(row[name])
    return value


def run_trial(argv: list[str], run_dir: Path, env: dict) -> tuple[int, float]:
    """Run one trial, its output in run_dir/trial.log; -> (exit status, seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "trial.log", "w") as log:
        log.write(" ".join(argv) + "\n\n")
        log.flush()
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    return rc, time.perf_counter() - t0


def _trial_rows(study, metric: str) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": f"trial_{t.number:03d}", "number": t.number, "state": t.state.name.lower(),
                     "params": t.user_attrs.get("params", t.params), "value": t.value,
                     "seconds": t.user_attrs.get("seconds"), "output_dir": t.user_attrs.get("output_dir")})
    return rows


def summary(sweep: dict, rows: list[dict]) -> tuple[str, dict | None]:
    """A Markdown table of the trials, and the best complete trial (or None)."""
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    names = [n for n, s in sweep["parameters"].items() if "value" not in s]
    lines = [f"| trial | state | {' | '.join(names)} | {metric} | s |", "|---" * (len(names) + 4) + "|"]
    for r in rows:
        val = "" if r["value"] is None else f"{r['value']:.6g}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['trial']} | {r['state']} | {' | '.join(str(r['params'].get(n, '')) for n in names)} "
                     f"| {val} | {secs} |")
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = (min if goal == "minimize" else max)(done, key=lambda r: r["value"]) if done else None
    return "\n".join(lines), best


def run_sweep(sweep_path: str | Path, *, trials: int | None, out: str | Path | None, overrides: list[str],
              seed: int = 0, log=print) -> dict:
    """Run `trials` new trials of the sweep (default: the rest of the grid, or run_cap). -> sweep.json."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    sweep = load_sweep(sweep_path)
    name = sweep.get("name") or Path(sweep_path).stem
    out = Path(out or Path("runs") / "sweeps" / name)
    out.mkdir(parents=True, exist_ok=True)
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    if sweep.get("early_terminate"):
        log("kd.sweep: early_terminate is ignored offline; every trial runs to the end")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    sampler = _sampler(sweep, seed)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                direction=goal)
    if trials is None:
        trials = len(grid(sweep)) if sweep["method"] == "grid" else sweep.get("run_cap")
        if trials is None:
            raise SweepError("--trials is required for random and bayes sweeps without run_cap")

    # trials find `accelerate`/`python` of this environment first, as an agent in an activated venv would
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.setdefault("WANDB_MODE", "offline")  # no W&B server here: log.tracker=wandb writes local runs
    for _ in range(trials):
        if sweep["method"] == "grid" and sampler.is_exhausted(study):
            log("kd.sweep: the grid is exhausted")
            break
        trial = study.ask()
        params = {n: _suggest(trial, n, s) for n, s in sweep["parameters"].items()}
        run_dir = out / f"trial_{trial.number:03d}"
        argv = [*expand_command(sweep, params), *overrides, f"--train.output_dir={run_dir}"]
        trial.set_user_attr("params", params)
        trial.set_user_attr("output_dir", str(run_dir))
        log(f"kd.sweep: {run_dir.name}: {' '.join(f'{k}={v}' for k, v in params.items())}")
        rc, secs = run_trial(argv, run_dir, {**env, "WANDB_RUN_ID": f"{name}-{run_dir.name}"})
        trial.set_user_attr("seconds", secs)
        value = last_metric(run_dir, metric) if rc == 0 else None
        if value is None:
            why = f"exit status {rc}" if rc else f"no {metric} in metrics.jsonl"
            log(f"kd.sweep: {run_dir.name} failed ({why}); see {run_dir / 'trial.log'}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            log(f"kd.sweep: {run_dir.name}: {metric}={value:.6g} ({secs:.0f}s)")
            study.tell(trial, value)
        _write_summary(out, sweep, sweep_path, _trial_rows(study, metric))

    rows = _trial_rows(study, metric)
    result = _write_summary(out, sweep, sweep_path, rows)
    table, best = summary(sweep, rows)
    log("\n" + table + "\n")
    if best is None:
        log("kd.sweep: no trial completed")
    else:
        log(f"best trial: {best['trial']} {metric}={best['value']:.6g} "
            f"({' '.join(f'{k}={v}' for k, v in best['params'].items())}) -> {best['output_dir']}")
    return result


def _write_summary(out: Path, sweep: dict, sweep_path, rows: list[dict]) -> dict:
    _, best = summary(sweep, rows)
    result = {"sweep": str(sweep_path), "method": sweep["method"], "metric": sweep["metric"],
              "trials": rows, "best": best["trial"] if best else None}
    tmp = out / f".sweep.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / "sweep.json")  # concurrent drivers: whole files only, last writer wins
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kd.sweep", allow_abbrev=False,
                                 description="Run a W&B sweep YAML offline with Optuna (see kd/tools/sweep.py).",
                                 epilog="Extra arguments are trainer overrides appended to every trial's argv.")
    ap.add_argument("sweep", help="W&B sweep YAML, e.g. configs/sweeps/demo_grid.yaml")
    ap.add_argument("--trials", type=int, default=None, help="trials to run now (default: the grid, or run_cap)")
    ap.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<name>)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed")
    args, overrides = ap.parse_known_args(argv)
    try:
        run_sweep(args.sweep, trials=args.trials, out=args.out, overrides=overrides, seed=args.seed)
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
