"""Fault injection: every way a run can go wrong off the happy path ends in one line (no traceback)
naming the file, key or step, and nothing non-finite or damaged is stepped, saved, exported or
executed. Commands: the real CLI on tiny builtin models (each run a few seconds)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PY, ROOT, run_cli, tiny_overrides
from kd import checkpoint
from kd.models import resolve

DEMO = "configs/demo.yaml"


def one_line_error(res: subprocess.CompletedProcess, code: int, pattern: str) -> str:
    assert res.returncode == code, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("kd: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    import re

    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory) -> str:
    """The shipped demo teacher with one NaN weight."""
    d = tmp_path_factory.mktemp("nan_teacher")
    src = Path(resolve("builtin:tiny-teacher"))
    for f in src.iterdir():
        shutil.copy(f, d / f.name)
    w = load_file(d / "model.safetensors")
    w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return str(d)


def test_nan_teacher_stops_at_once_and_saves_nothing(small_data, tmp_path, nan_teacher):
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{"teacher.name_or_path": nan_teacher,
                                                                        "train.save_every": 1})], check=False)
    one_line_error(res, 3, r"step 1: the teacher's outputs are non-finite")
    assert not (out / "checkpoints").exists() and not (out / "student").exists()


def test_nan_teacher_in_eval_is_never_reported(small_data, tmp_path, nan_teacher):
    # alpha = 1 trains without the teacher; eval still scores against it and must not log NaNs
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
        "teacher.name_or_path": nan_teacher, "loss.alpha": 1.0, "train.eval_every": 1})], check=False)
    one_line_error(res, 3, r"step 1: eval metrics are non-finite \(kd, loss\); no checkpoint was written$")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("eval/ce" in r for r in rows) and not (out / "student").exists()


def _nan_after(monkeypatch, first_bad: int, last_bad: int = 10**9):
    """Teacher outputs turn NaN for forward calls first_bad..last_bad (0-based)."""
    import kd.train

    real, calls = kd.train.teacher_forward, []

    def flaky(teacher, batch):
        h = real(teacher, batch)
        calls.append(1)
        return h.clone().fill_(float("nan")) if first_bad <= len(calls) - 1 <= last_bad else h

    monkeypatch.setattr(kd.train, "teacher_forward", flaky)


def test_skip_mode_skips_counts_and_carries_on(small_data, tmp_path, monkeypatch):
    from kd.config import load_config
    from kd.train import train

    _nan_after(monkeypatch, 2, 3)  # steps 3 and 4 see a broken teacher
    out = tmp_path / "run"
    cfg = load_config(DEMO, tiny_overrides(small_data, out, **{"train.max_steps": 6, "train.on_nonfinite": "skip",
                                                               "train.max_skipped_steps": 3}))
    assert train(cfg)["skipped_steps"] == 2
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert "train/loss" not in rows[3] and "train/loss" not in rows[4] and "train/loss" in rows[5]
    assert rows[6]["train/skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(out / "student" / "model.safetensors").values())


def test_skip_mode_stops_after_too_many_in_a_row(small_data, tmp_path, monkeypatch):
    from kd.config import load_config
    from kd.guard import NonFiniteError
    from kd.train import train

    _nan_after(monkeypatch, 1)
    cfg = load_config(DEMO, tiny_overrides(small_data, tmp_path / "run", **{
        "train.max_steps": 6, "train.on_nonfinite": "skip", "train.max_skipped_steps": 2}))
    with pytest.raises(NonFiniteError, match=r"step 3: the teacher's outputs went non-finite \(2 steps in a row\)"):
        train(cfg)


def test_export_refuses_non_finite_weights(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.forward import Distiller
    from kd.loss import LossSpec

    student = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-student"))
    with torch.no_grad():
        student.model.norm.weight[3] = float("inf")
    tok = AutoTokenizer.from_pretrained(resolve("builtin:tokenizer"))
    acc = Accelerator(cpu=True)
    with pytest.raises(checkpoint.CheckpointError, match="not exporting the student: tensor 'model.norm.weight'"):
        checkpoint.export(acc, Distiller(student, LossSpec(len(tok))), tok, str(tmp_path))
    assert not (tmp_path / "student").exists()


def test_a_failed_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.forward import Distiller
    from kd.loss import LossSpec

    student = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-student"))
    tok = AutoTokenizer.from_pretrained(resolve("builtin:tokenizer"))
    real = type(tok).save_pretrained

    def disk_fills(self, directory, *a, **k):  # the weights are written, then the disk is full
        real(self, directory, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", disk_fills)
    with pytest.raises(checkpoint.CheckpointError, match=r"^student not exported: no space left on the device of "
                                                         r".*\.student\.partial \([0-9.]+ MiB free\)"):
        checkpoint.export(Accelerator(cpu=True), Distiller(student, LossSpec(len(tok))), tok, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _replace_verified(step: Path, name: str, data: bytes) -> None:
    """Put `data` in place of a checkpoint file and record its checksum, so only the content is wrong."""
    (step / name).write_bytes(data)
    record = json.loads((step / "checksums.json").read_text())
    record["files"][name] = {"size": len(data), "xxh3_128": checkpoint.file_digest(step / name)}
    (step / "checksums.json").write_text(json.dumps(record))


def test_a_verified_file_that_is_not_safetensors_is_one_line(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 1, "train.save_every": 1})]
    run_cli(args)
    step = out / "checkpoints" / "step_00000001"
    kept = {n: (step / n).read_bytes() for n in ("model.safetensors", "optimizer.safetensors",
                                                   "rng_00000.safetensors", "checksums.json")}
    for name in ("model.safetensors", "optimizer.safetensors", "rng_00000.safetensors"):
        _replace_verified(step, name, b"not a safetensors file at all")
        one_line_error(run_cli(args + ["train.max_steps=2"], check=False), 2,
                       rf"step_00000001/{name}: (not a readable safetensors file|cannot be loaded into this model)")
        for n, data in kept.items():
            (step / n).write_bytes(data)
    # valid safetensors of the wrong shape: said, not a traceback
    from safetensors.torch import save

    _replace_verified(step, "model.safetensors", save({"student.lm_head.weight": torch.zeros(2, 2)}))
    one_line_error(run_cli(args + ["train.max_steps=2"], check=False), 2,
                   r"model.safetensors: cannot be loaded into this model")
    # kd.evaluate reads the same checkpoint the same way
    from kd.tools import evaluate as ev

    _replace_verified(step, "model.safetensors", b"garbage")
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(out), "--data", small_data["eval"], "--no-generate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "model.safetensors: cannot be loaded into this model" in err[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "student" / "model.safetensors")


def test_damaged_checkpoints_fall_back_and_still_end_bitwise(small_data, tmp_path):
    args = lambda out: ["--config", DEMO, *tiny_overrides(small_data, out, **{  # noqa: E731
        "train.max_steps": 6, "train.save_every": 2, "train.keep_checkpoints": 3})]
    ref = tmp_path / "ref"
    run_cli(args(ref))
    out = tmp_path / "run"
    run_cli(args(out))
    ckpt = out / "checkpoints"

    def rerun(expect_from: str):
        shutil.rmtree(out / "student")
        res = run_cli(args(out))
        assert f"resuming from {expect_from} instead" in res.stdout and "is damaged or incomplete" in res.stdout
        for k, v in weights(ref).items():
            assert torch.equal(weights(out)[k], v), k

    # 4 KiB overwritten inside the newest weights file, same size: the checksum catches it
    with open(ckpt / "step_00000006" / "model.safetensors", "r+b") as fh:
        fh.seek(2000)
        fh.write(os.urandom(4096))
    rerun("step_00000004")
    # a truncated weights file in the newest, a deleted optimizer state in the next
    with open(ckpt / "step_00000006" / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    (ckpt / "step_00000004" / "optimizer.safetensors").unlink()
    rerun("step_00000002")
    # none verifies: one line, nothing loaded
    for d in ckpt.glob("step_*"):
        (d / "checksums.json").unlink()
    one_line_error(run_cli(args(out), check=False), 2, r"no checkpoint verifies \(3 checked\)")


def test_resume_executes_no_pickle(small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 2, "train.save_every": 1})]
    run_cli(args)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = out / "checkpoints" / "step_00000002"
    assert not [p for p in step.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]  # kd writes no pickle
    # the files accelerate used to unpickle on resume: planted, even listed as verified
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (step / name).write_bytes(pickle.dumps(Evil()))
    record = json.loads((step / "checksums.json").read_text())
    record["files"].update({n: {"size": (step / n).stat().st_size, "xxh3_128": checkpoint.file_digest(step / n)}
                            for n in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                      "custom_checkpoint_0.pkl")})
    (step / "checksums.json").write_text(json.dumps(record))
    res = run_cli(args + ["train.max_steps=3"])
    assert "resumed from" in res.stdout and not marker.exists()
    # DeepSpeed's engine files are unpickled with torch's restricted loader: a crafted one is refused
    evil = tmp_path / "engine.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(checkpoint.CheckpointError, match="refused to unpickle"):
        checkpoint._safe_torch_load(str(evil))
    assert not marker.exists()


def test_config_drift_is_refused_or_applied(small_data, tmp_path):
    out = tmp_path / "run"
    base = tiny_overrides(small_data, out, **{"train.max_steps": 2, "train.save_every": 2, "optim.warmup_steps": 0})
    run_cli(["--config", DEMO, *base])
    res = run_cli(["--config", DEMO, *base, "train.max_steps=4", "optim.lr=0.03", "train.micro_batch_size=2"],
                  check=False)
    one_line_error(res, 2, r"checkpoint at step 2 was made with other settings \(optim.lr: 0.003 -> 0.03; "
                           r"train.max_steps: 2 -> 4; train.micro_batch_size: 4 -> 2\)")
    # things that cannot change the trajectory pass silently; max_steps may grow (schedule kept)
    res = run_cli(["--config", DEMO, *base, "train.max_steps=3", "train.eval_every=1", "log.log_every=1"])
    assert "the LR schedule keeps its recorded length (2 steps)" in res.stdout
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["train/lr"] == pytest.approx(0.003 * 0.1)  # past the recorded end: lr x min_lr_ratio
    # allowed: the new lr really takes effect (the schedule is rebuilt with the new length)
    res = run_cli(["--config", DEMO, *base, "train.max_steps=5", "optim.lr=0.03", "train.resume_changes=allow"])
    assert "resuming with changed settings" in res.stdout and "optim.lr: 0.003 -> 0.03" in res.stdout
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    import math

    assert rows[4]["train/lr"] == pytest.approx(0.03 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 5))))


def test_a_run_grown_past_a_long_warmup_runs_at_the_floor_it_promises():
    from kd.config import load_config
    from kd.train import make_optimizer

    cfg = load_config(DEMO, ["optim.warmup_steps=10", "train.max_steps=4"])
    _, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg)
    factor = scheduler.lr_lambdas[0]
    assert [factor(s) for s in range(4)] == [0.1, 0.2, 0.3, 0.4]  # warming up inside the schedule
    assert factor(4) == factor(9) == cfg.optim.min_lr_ratio  # grown past it: lr x min_lr_ratio, as said


def test_environment_errors_are_one_line(small_data, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(run_cli(["--config", DEMO, *tiny_overrides(small_data, a_file)], check=False), 2,
                   r"train.output_dir=.*file is a file, not a directory")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "r"),
                            f"data.train_files=[{empty}]"], check=False), 2, r"empty.jsonl: no records")


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_previous_checkpoint(small_data, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=2600k"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        out = disk / "run"
        res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
            "train.max_steps": 4, "train.save_every": 2, "train.keep_checkpoints": 3})], check=False)
        one_line_error(res, 2, r"checkpoint at step 4 not saved: no space left on the device of .*\.step_00000004"
                               r"\.partial \([0-9.]+ MiB free\); the previous checkpoint is kept")
        ckpt = out / "checkpoints"
        assert (ckpt / "latest").read_text() == "step_00000002" and not list(ckpt.glob(".step_*"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_output_dir(small_data, tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        res = run_cli(["--config", DEMO, *tiny_overrides(small_data, ro)], check=False)
        one_line_error(res, 2, r"train.output_dir=.*ro is not writable")
    finally:
        subprocess.run(["umount", str(ro)])


def test_a_live_run_holds_the_directory_and_a_killed_one_does_not(small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 400, "train.save_every": 0})]
    first = subprocess.Popen([PY, "-m", "kd.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        one_line_error(run_cli(args, check=False), 2, rf"another run is using .*run \(pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    res = run_cli([*args, "train.max_steps=1", "train.resume=off"])
    assert f"took over the run lock of a previous run (pid {first.pid} on" in res.stdout
