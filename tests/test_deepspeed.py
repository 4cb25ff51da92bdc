"""DeepSpeed on 2 CPU ranks (gloo): student ZeRO-2 or ZeRO-3, teacher ZeRO-3 inference.

Each run equals a single-process run of the same global batch; the teacher is really partitioned;
a killed ZeRO-3 run resumes to the same weights; the exported student is a normal HF checkpoint.
The first DeepSpeed start on a machine JIT-builds a comm op (~60 s, cached afterwards).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ACCELERATE, ROOT, free_port, kill_run, run_cli, tiny_overrides
from kd.checkpoint import file_digest

pytestmark = pytest.mark.slow
DEMO = "configs/demo.yaml"


def ds_cmd(stage: int, args: list[str]) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", f"launch/cpu_ds2_zero{stage}.yaml", "--main_process_port",
            str(free_port()), "--num_cpu_threads_per_process", "1", "kd/train.py", "--config", DEMO, *args]


def run_ds(stage: int, args: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(ds_cmd(stage, args), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def student_weights(out):
    return load_file(str(out / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """Single process, micro-batch 8: the same global batch as 2 ranks x micro-batch 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **EXTRA, **{"train.micro_batch_size": 8})])
    return rows(out), student_weights(out)


EXTRA = {"train.max_steps": 4, "train.eval_every": 2, "train.save_every": 2}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process_and_partitions_the_teacher(stage, reference, small_data, tmp_path):
    out = tmp_path / "run"
    res = run_ds(stage, tiny_overrides(small_data, out, **EXTRA))
    assert "teacher: ZeRO-3 partitioned, rank 0 holds" in res.stdout
    frac = float(res.stdout.split("parameters (")[1].split("%")[0])
    assert 45.0 <= frac <= 55.0  # each of the 2 ranks holds about half of the teacher

    ref_rows, ref_w = reference
    got = rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref_rows]
    for r, ref in zip(got, ref_rows):
        assert r["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
        assert r["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-5)
        if "eval/ce" in ref:
            assert r["eval/ce"] == pytest.approx(ref["eval/ce"], rel=1e-6)
            assert r["eval/top1_agreement"] == pytest.approx(ref["eval/top1_agreement"], abs=1e-9)
    w = student_weights(out)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=k)
    AutoModelForCausalLM.from_pretrained(out / "student")  # a normal HF checkpoint


def test_zero3_killed_run_resumes_to_the_same_weights(small_data, tmp_path):
    extra = {"train.max_steps": 16, "train.save_every": 4, "train.micro_batch_size": 2}
    ref = tmp_path / "ref"
    run_ds(3, tiny_overrides(small_data, ref, **extra))

    out = tmp_path / "killed"
    proc = subprocess.Popen(ds_cmd(3, tiny_overrides(small_data, out, **extra)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_run(proc)  # the launcher and both ranks
    killed_at = latest.read_text()
    assert killed_at != "step_00000016", "the run finished before it could be killed"

    res = run_ds(3, tiny_overrides(small_data, out, **extra))
    assert f"resumed from {out / 'checkpoints' / killed_at}" in res.stdout
    a, b = student_weights(ref), student_weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)

    # DeepSpeed's engine files are the only pickles in a checkpoint: each replaced by a crafted one,
    # even with matching checksums, is refused by the restricted unpickler and never executed
    marker = tmp_path / "pwned"
    step = out / "checkpoints" / latest.read_text().strip()
    evil = pickle.dumps(Evil(f"touch {marker}"))
    record = json.loads((step / "checksums.json").read_text())
    engine_files = list((step / "engine").rglob("*.pt"))
    assert engine_files
    for f in engine_files:
        f.write_bytes(evil)
        record["files"][str(f.relative_to(step))] = {"size": len(evil), "xxh3_128": file_digest(f)}
    (step / "checksums.json").write_text(json.dumps(record))
    # a longer run, so the checkpoint is loaded (the finished run itself would only say it is finished)
    longer = {**extra, "train.max_steps": extra["train.max_steps"] + 2, "train.resume_changes": "allow"}
    res = subprocess.run(ds_cmd(3, tiny_overrides(small_data, out, **longer)), cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    # (the launcher exits 1 after the ranks exit 2, and adds its own report after our line)
    assert res.returncode != 0 and "kd: error:" in res.stderr and "refused to unpickle" in res.stderr, res.stderr[-3000:]
    assert not marker.exists()


class Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))
