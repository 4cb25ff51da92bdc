"""kd.experiment: a miniature end-to-end run (1 seed, 1 step, a few problems) and the report maths."""

from __future__ import annotations

import argparse
import json
import subprocess

from conftest import PY, ROOT

from kd.demo import experiment


def test_mean_std_and_format():
    assert experiment.mean_std([0.5]) == (0.5, 0.0)
    m, sd = experiment.mean_std([0.2, 0.4, 0.6])
    assert abs(m - 0.4) < 1e-12 and abs(sd - 0.2) < 1e-12  # sample std (n - 1)
    assert experiment.pm([0.2, 0.4, 0.6]) == "40.0 ± 20.0"
    assert experiment.pm([0.25]) == "25.0"
    assert experiment.pm([1.5, 2.5], pct=False) == "2.000 ± 0.707"


def test_settings_overrides():
    a = argparse.Namespace(seeds=2, max_steps=7, train_limit=10, eval_limit=5, max_new_tokens=30, variants="ce_erase")
    s = experiment.load_settings(str(ROOT / "configs/experiment/default.yaml"), a)
    assert s["seeds"] == 2 and s["train_overrides"]["train.max_steps"] == 7
    assert s["train_limit"] == 10 and s["eval"]["limit"] == 5 and s["eval"]["max_new_tokens"] == 30
    assert list(s["variants"]) == ["ce_erase"]
    # The protocol the results depend on: held-out eval file, all three variants by default.
    full = experiment.load_settings(str(ROOT / "configs/experiment/default.yaml"),
                                    argparse.Namespace(**dict.fromkeys(vars(a), None)))
    assert full["eval_data"] == "data/demo/eval.jsonl" and full["seeds"] >= 3
    assert set(full["variants"]) == {"ce_erase", "kd_erase", "kd_noerase"}


def test_experiment_configs_are_complete_and_distinct():
    from kd.demo import builtin

    configs = sorted((ROOT / "configs/experiment").glob("*.yaml"))
    assert len(configs) >= 2
    none = argparse.Namespace(seeds=None, max_steps=None, train_limit=None, eval_limit=None, max_new_tokens=None,
                              variants=None)
    reports = set()
    for path in configs:
        s = experiment.load_settings(str(path), none)
        for key in ("train_prompts", "eval_data", "base_config"):
            assert (ROOT / s[key]).is_file(), (path.name, key)
        for key in ("teacher", "student"):
            assert s[key] in builtin.builtin_names(), (path.name, key)
        if s.get("kind") == "choice":  # the entropy experiment: four arms, at least 5 seeds, three sizes
            assert s["seeds"] >= 5 and set(s["arms"]) == {"ce", "kd", "onpolicy", "kd_noerase"}
            assert len(s["sizes"]) >= 3 and max(s["sizes"]) >= 16 * min(s["sizes"])
        elif s.get("kind") == "onpolicy":  # issue 23's arms, >= 5 final seeds disjoint from the dev seed
            assert s["seeds"] >= 5 and not s["seeds_from"] <= s["dev_seed"] < s["seeds_from"] + s["seeds"]
            assert {"offpolicy", "offpolicy_long", "onpolicy", "onpolicy_full", "onpolicy_noerase",
                    "onpolicy_fkl"} <= set(s["arms"])
            assert s["baseline"] in s["arms"] and s["baseline_wallclock"] in s["arms"]
            assert s["arms"]["onpolicy_full"]["overrides"]["onpolicy.fraction"] == 1.0
            assert s["arms"]["onpolicy_noerase"]["overrides"]["data.erase_strategy"] == "off"
            assert s["arms"]["onpolicy_fkl"]["overrides"]["onpolicy.divergence"] == "forward_kl"
            assert s["warm"]["steps"] in s["curve"] and s["dev_prompts"] > 0
        else:
            assert s["seeds"] >= 3 and set(s["variants"]) == {"ce_erase", "kd_erase", "kd_noerase"}
        reports.add(s["report"])
    assert len(reports) == len(configs)  # each config writes its own results file


def test_miniature_experiment(tmp_path):
    out, report = tmp_path / "exp", tmp_path / "results.md"
    report.write_text("old table\n" + experiment.NOTES + "\nhand-written notes\n")
    cmd = [PY, "-m", "kd.experiment", "--seeds", "1", "--max-steps", "1", "--train-limit", "16",
           "--eval-limit", "4", "--max-new-tokens", "16", "--out", str(out), "--report", str(report)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = report.read_text()
    assert "old table" not in text and text.endswith(experiment.NOTES + "\nhand-written notes\n")
    for label in ("teacher, with its instructions", "teacher, generic system", "(a) CE only", "(b) logit KD + CE",
                  "(c) logit KD + CE, no erasure"):
        assert label in text
    assert "python -m kd.experiment --seeds 1" in text
    r = json.loads((out / "results.json").read_text())
    assert sorted(r["runs"]) == ["ce_erase", "kd_erase", "kd_noerase"]
    for variant, runs in r["runs"].items():
        (run,) = runs
        assert run["generic"]["n"] == 4 and run["overrides"]["train.max_steps"] == 1
        assert run["overrides"]["data.erase_strategy"] == ("off" if variant == "kd_noerase" else "on")
        assert run["overrides"]["loss.alpha"] == (1.0 if variant == "ce_erase" else 0.5)
        assert 0.0 <= run["token_metrics"]["top1_agreement"] <= 1.0
    gen = [json.loads(line) for line in open(out / "data" / "teacher_train.jsonl")]
    assert len(gen) == 16 and all("system" in g and "response" in g for g in gen)
    assert r["teacher"]["strategy"]["n"] == 4
    # A rerun with the same settings reuses every finished piece.
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.count("reusing") == 4, res.stdout[-2000:]


def test_miniature_onpolicy_experiment(tmp_path):
    """The on-policy experiment end to end at 2 steps a run: every arm, the curve, the report."""
    from kd.demo import onpolicy_experiment as ox

    out, report = tmp_path / "exp", tmp_path / "results.md"
    report.write_text("old table\n" + ox.NOTES + "\nhand-written reading\n")
    cmd = [PY, "-m", "kd.experiment", "--config", "configs/experiment/onpolicy.yaml", "--seeds", "1",
           "--max-steps", "2", "--train-limit", "40", "--eval-limit", "4", "--max-new-tokens", "12",
           "--out", str(out), "--report", str(report), "--jobs", "2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    s = r["settings"]
    assert s["seeds"] == [10] and s["dev_prompts"] == 20  # the dev split: half of 40 at most
    assert len(read(out / "data" / "train.jsonl")) == 20 and len(read(out / "data" / "teacher_dev.jsonl")) == 20
    dev = {x["prompt"] for x in read(out / "data" / "teacher_dev.jsonl")}
    assert not dev & {x["prompt"] for x in read(out / "data" / "train.jsonl")}
    assert [c["steps"] for c in r["curve"]] == [2] and r["curve"][0]["seed"] == 1000
    assert set(r["runs"]) == set(s["arms"]) and all(len(v) == 1 for v in r["runs"].values())
    for arm, (run,) in r["runs"].items():
        assert run["seed"] == 10 and 0 <= run["valid_greedy"] <= 1 and run["own_len"] > 0
        assert run["train_seconds"] > 0 and run["own_teacher_nll"] > 0
        cfg = (out / "runs" / arm / "seed10" / "config.yaml").read_text()
        scratch = s["arms"][arm].get("from") == "scratch"
        assert ("builtin:tiny-student" in cfg) == scratch, arm  # the others start from the warm export
        steps = 2 * s["arms"][arm].get("steps_factor", 1)
        assert sum(1 for _ in open(out / "runs" / arm / "seed10" / "metrics.jsonl")) >= 1
        assert f"max_steps: {steps}" in cfg, arm
        if arm == "onpolicy_full":  # every step generates, so the training cut share is measured
            assert 0 <= run["train_cut_share"] <= run["train_cut_max"] <= 1 and "guard_step" in run
    text = report.read_text()
    assert "old table" not in text and text.endswith(ox.NOTES + "\nhand-written reading\n")
    assert ox.PROTOCOL in text and "Paired differences against (a) off-policy KD continued" in text
    for label in [a["label"] for a in s["arms"].values()] + ["warm start (W steps"]:
        assert label in text
    # a rerun with the same settings trains and evaluates nothing again
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "trained in" not in res.stdout and "sampled length" not in res.stdout, res.stdout[-2000:]


def read(path):
    return [json.loads(line) for line in open(path) if line.strip()]
