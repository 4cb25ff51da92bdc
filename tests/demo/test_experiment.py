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
