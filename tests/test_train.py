"""End-to-end runs of the real CLI on tiny builtin models (single process and 2 CPU ranks)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PY, ROOT, cli_cmd, kill_run, run_cli, tiny_overrides
from kd.models import resolve

DEMO = "configs/demo.yaml"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def test_cli_run_writes_config_metrics_checkpoints_and_a_loadable_student(small_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(small_data, out, **{"train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2})
    # both override forms, as a user and a W&B sweep agent would pass them
    args += ["--loss.temperature=2.0", "loss.divergence=jsd"]
    res = run_cli(["--config", DEMO, *args])
    assert "train data: 48 examples" in res.stdout

    cfg = (out / "config.yaml").read_text()
    assert "temperature: 2.0" in cfg and "divergence: jsd" in cfg
    # what is optimised, stated at start and on config.yaml's first line
    goal = "objective: 0.5·CE + 0.5·T²(=4)·JSD(β=0.5)(teacher, student) at T=2 per target token"
    assert cfg.startswith(f"# {goal}") and res.stdout.startswith(goal)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/loss", "train/ce", "train/kd", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/response_tokens"):
        assert all(key in r for r in rows)
    assert {"eval/ce", "eval/kd", "eval/top1_agreement"} <= rows[1].keys() and "eval/ce" not in rows[0]
    for r in rows:  # loss = alpha*CE + (1-alpha)*T^2*KD, per response token
        assert r["train/loss"] == pytest.approx(0.5 * r["train/ce"] + 0.5 * 4.0 * r["train/kd"], rel=1e-6)

    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def _equivalence_run(small_data, out, mb, accum, procs, packing=False):
    args = tiny_overrides(small_data, out, **{
        "train.micro_batch_size": mb, "train.grad_accum_steps": accum, "train.max_steps": 3,
        "optim.max_grad_norm": 0, "data.eval_files": "[]", "data.eval_fraction": 0, "data.packing": packing})
    run_cli(["--config", DEMO, *args], procs=procs)
    return metrics(out), weights(out)


@pytest.mark.slow
def test_gradients_equal_across_micro_batch_accumulation_and_ranks(small_data, tmp_path):
    """The normaliser is the global response-token count of the optimizer step: (8, 1), (2, 4) and
    2 ranks x (4, 1) see the same examples per step and must produce the same gradients; so must
    2 ranks with packed micro-batches (packing changes nothing but speed)."""
    ref_rows, ref_w = _equivalence_run(small_data, tmp_path / "a", 8, 1, 0)
    for name, mb, accum, procs, packing in (("b", 2, 4, 0, False), ("c", 4, 1, 2, False), ("d", 4, 1, 2, True)):
        rows, w = _equivalence_run(small_data, tmp_path / name, mb, accum, procs, packing)
        for r, ref in zip(rows, ref_rows, strict=True):
            assert r["train/response_tokens"] == ref["train/response_tokens"]
            # grad_norm is taken before the update: it checks the gradients, not only Adam's output
            assert r["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-5)
            assert r["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("procs", [0, 2], ids=["one-process", "ddp-2-ranks"])
def test_killed_run_resumes_to_identical_weights(procs, small_data, tmp_path):
    extra = {"train.max_steps": 30 if procs == 0 else 16, "train.save_every": 4, "train.keep_checkpoints": 2}
    if procs:
        extra["train.micro_batch_size"] = 2  # the same global batch as one process at 4
    last = f"step_{extra['train.max_steps']:08d}"
    ref = tmp_path / "ref"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, ref, **extra)], procs=procs)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_cmd(["--config", DEMO, *tiny_overrides(small_data, out, **extra)], procs), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_run(proc)
    killed_at = latest.read_text()
    assert killed_at != last, "the run finished before it could be killed"
    assert not (out / "student").exists()

    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **extra)], procs=procs)
    assert f"resumed from {out / 'checkpoints' / killed_at}" in res.stdout
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    assert [r["step"] for r in metrics(out)] == list(range(1, extra["train.max_steps"] + 1))
    assert [r["train/loss"] for r in metrics(out)] == [r["train/loss"] for r in metrics(ref)]


def test_half_written_checkpoint_is_never_latest(small_data, tmp_path):
    out = tmp_path / "run"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 2, "train.save_every": 1})])
    ckpts = out / "checkpoints"
    # simulate a kill during the next save: a partial directory without its state file
    partial = ckpts / ".step_00000003.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 3, "train.save_every": 1})])
    assert "resumed from" in res.stdout and "step_00000002" in res.stdout
    assert (ckpts / "latest").read_text() == "step_00000003" and not partial.exists()


def _latin1(tmp_path, data):
    p = tmp_path / "latin1.jsonl"
    rows = Path(data["train"]).read_text().splitlines()
    rec = dict(json.loads(rows[2]), response="caf\u00e9 au lait")
    rows[2] = json.dumps(rec, ensure_ascii=False)
    p.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return [f"data.train_files=[{p}]"]


def _all_rows_bad(tmp_path, data):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
                         for line in Path(data["train"]).read_text().splitlines()))
    return [f"data.train_files=[{p}]", "data.eval_files=[]", "data.eval_fraction=0.25"]


# (overrides, or a function of (tmp_path, small_data) that writes the input and returns them) -> last line
BAD_INPUTS = {
    "unknown key": (["loss.temprature=2"],
                    "kd: error: unknown config key 'loss.temprature' (command line) (did you mean 'loss.temperature'?)"),
    "bad value": (["--loss.temperature=abc"], "kd: error: bad value for 'loss.temperature' (command line)"),
    "negative lr": (["optim.lr=-1"], "kd: error: optim.lr must be > 0"),
    "negative warmup": (["optim.warmup_steps=-5"], "kd: error: optim.warmup_steps must be >= 0"),
    "missing model dir": (["teacher.name_or_path=/nonexistent/model"],
                          "kd: error: no such directory: /nonexistent/model (teacher.name_or_path)"),
    "not UTF-8": (_latin1, "kd: error: {tmp}/latin1.jsonl:3: not UTF-8 (byte 0xe9 at column "),
    # rows are shuffled for the eval hold-out and tokenised by two workers: the file's first bad row is named
    "every row bad": (_all_rows_bad, "kd: error: {tmp}/bad.jsonl row 1: missing 'response'"),
    "run length twice": (["train.epochs=1", "train.max_steps=4"],
                         "kd: error: set exactly one of train.max_steps and train.epochs"),
    "no template file": (["data.chat_template=templates/missing.jinja"],
                         "kd: error: no such file: templates/missing.jinja (data.chat_template"),
    # the sandbox holds; the violation is the user's template, named with the row it failed on
    "template sandbox": (["data.chat_template='{{ cycler.__init__.__globals__.os }}'"],
                         "kd: error: {train} row 1: the chat template fails on it (SecurityError: access to "
                         "attribute '__init__'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_writes_nothing(case, small_data, tmp_path):
    args, message = BAD_INPUTS[case]
    if callable(args):
        args = args(tmp_path, small_data)
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{"data.num_proc": 2}), *args], check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(message.format(tmp=tmp_path, train=small_data["train"])), lines[-1]
    assert sum(line.startswith("kd: error") for line in lines) == 1 and "Traceback" not in res.stderr
    assert not out.exists()  # nothing written: no run directory, lock, config or store


def test_data_inputs_as_users_write_them_train_from_the_cli(small_data, tmp_path):
    """One path where a list is expected, a glob, a directory of data files, and the run length
    chosen on the command line (the shipped config sets train.max_steps)."""
    d = tmp_path / "data"
    (d / "eval").mkdir(parents=True)
    lines = Path(small_data["train"]).read_text().splitlines(keepends=True)
    (d / "part1.jsonl").write_text("".join(lines[:6]))
    (d / "part2.jsonl").write_text("".join(lines[6:12]))
    (d / "eval" / "e.jsonl").write_text("".join(lines[12:16]))
    out = tmp_path / "run"
    base = [o for o in tiny_overrides(small_data, out) if not o.startswith("train.max_steps=")]
    res = run_cli(["--config", DEMO, *base, f"data.train_files={d}/part*.jsonl", f"data.eval_files={d / 'eval'}",
                   "train.epochs=1", "train.micro_batch_size=4", "data.store=off"])
    assert "train data: 12 examples" in res.stdout and "eval data: 4 examples" in res.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and (out / "student").exists()


def test_a_finished_run_says_so_and_an_error_exit_leaves_no_lock_holder(small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 2})]
    run_cli(args)
    exported = (out / "student" / "model.safetensors").stat().st_mtime_ns
    failed = run_cli(args + ["data.train_files=[/nonexistent.jsonl]"], check=False)
    assert failed.returncode == 2 and "data file not found" in failed.stderr
    res = run_cli(args)
    assert f"{out}: this run already finished at step 2 (student in {out / 'student'}); raise train.max_steps" \
        in res.stdout
    assert "took over" not in res.stdout + res.stderr  # the failed run released its lock on the way out
    assert (out / "student" / "model.safetensors").stat().st_mtime_ns == exported  # not exported again
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_mismatched_tokenizers_are_refused(small_data, tmp_path):
    other = tmp_path / "other_tok"
    tok = AutoTokenizer.from_pretrained(ROOT / "kd" / "demo" / "assets" / "tokenizer")
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    model = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-teacher"))
    model.save_pretrained(other)
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "run"), f"teacher.name_or_path={other}"],
                  check=False)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "use different tokenizers" in line and "only in the teacher: '<extra_token>'" in line
    assert "student.tokenizer=<dir> or teacher.tokenizer=<dir>" in line


def test_wandb_offline_tracking_with_sample_generations(small_data, tmp_path):
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
        "train.max_steps": 2, "train.eval_every": 1, "log.tracker": "wandb", "log.project": "kd-test",
        "log.samples": 2, "log.sample_max_new_tokens": 12})])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # the run config (in the offline run's record file) carries the objective line
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert "objective: 0.5·CE + 0.5·T²(=4)·KL(teacher‖student) at T=2".encode() in record
    assert runs[0].name.endswith((out / "wandb_run_id").read_text())  # resumes continue the same run
    assert res.stdout.count("eval ce") == 2  # one console line per evaluation

    # samples.jsonl: each evaluation's greedy answers of the student, in its (erased) view
    from kd.tools.generation import generate_texts
    from kd.tools.prompt_records import prompt_messages

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["example"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    recs = [json.loads(line) for line in open(small_data["eval"])][:2]
    tok = AutoTokenizer.from_pretrained(out / "student")
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    want = generate_texts(student, tok, [prompt_messages(r, "generic") for r in recs], max_new_tokens=12)
    assert [r["generation"] for r in rows[2:]] == want
    assert [r["reference"] for r in rows[2:]] == [r["response"] for r in recs]
    assert all("You are a helpful assistant." in r["prompt"] and rec["system"] not in r["prompt"]
               for r, rec in zip(rows[2:], recs))


@pytest.mark.parametrize("how", ["SIGUSR1", "Ctrl-C", "STOP file"])
def test_stop_request_checkpoints_and_exits_cleanly(how, small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--config", DEMO, *tiny_overrides(small_data, out, **{"train.max_steps": 200, "train.save_every": 0})]
    proc = subprocess.Popen([PY, "-m", "kd.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    jsonl = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (jsonl.exists() and jsonl.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    if how == "SIGUSR1":
        proc.send_signal(signal.SIGUSR1)
    elif how == "Ctrl-C":  # the first one saves, as SIGTERM does, and says so
        proc.send_signal(signal.SIGINT)
    else:
        (out / "STOP").touch()
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stop requested" in stdout
    if how == "Ctrl-C":
        assert "Ctrl-C: stopping after this step to save a checkpoint; Ctrl-C again aborts without saving" in stdout
    step = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 0 < step < 200 and not (out / "student").exists()
    # shortening the run changes the schedule: an allowed change, listed on resume
    res = run_cli(args + ["train.max_steps=" + str(step + 2), "train.resume_changes=allow"])  # resumes, clears STOP
    assert "train.max_steps: 200 -> " in res.stdout
    assert f"at step {step}" in res.stdout and (out / "student").exists() and not (out / "STOP").exists()


def test_chunked_and_dense_training_agree(small_data, tmp_path):
    """The trainer's default (chunked lm_head + loss) follows the dense reference step for step."""
    runs = {}
    for impl in ("dense", "chunked"):
        out = tmp_path / impl
        run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
            "loss.implementation": impl, "loss.chunk_size": 37, "loss.divergence": "jsd", "train.eval_every": 3})])
        runs[impl] = (metrics(out), weights(out))
    (rd, wd), (rc, wc) = runs["dense"], runs["chunked"]
    for a, b in zip(rd, rc, strict=True):
        for key in ("train/loss", "train/ce", "train/kd", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for k in wd:
        torch.testing.assert_close(wc[k], wd[k], rtol=1e-4, atol=1e-5, msg=k)


def test_packed_and_padded_training_agree(small_data, tmp_path):
    runs = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
            "data.packing": packing, "train.eval_every": 3, "loss.divergence": "jsd"})])
        runs[packing] = (metrics(out), weights(out))
        said = "packing on (rows of <= 256 tokens, examples kept apart: checked)" if packing == "true" \
            else "packing off"
        assert f"features: 1 process, cpu, {said}, store " in res.stdout and "LoRA off, on-policy off" in res.stdout
    (rp, wp), (rk, wk) = runs["false"], runs["true"]
    for a, b in zip(rp, rk, strict=True):
        assert a["train/response_tokens"] == b["train/response_tokens"]
        for key in ("train/loss", "train/ce", "train/kd", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["train/tokens_per_s"] > 0
    for k in wp:
        torch.testing.assert_close(wk[k], wp[k], rtol=1e-4, atol=1e-5, msg=k)


def test_multi_turn_sharegpt_and_save_to_disk_data_train_from_the_cli(small_data, tmp_path):
    """Conversations of 3 demo problems (ShareGPT keys, every assistant turn trained), one of them
    as a save_to_disk DatasetDict for eval; the run length given in epochs."""
    import datasets

    recs = [json.loads(line) for line in open(small_data["train"])]
    convs = []
    for i in range(0, len(recs) - 2, 3):
        turns = [{"from": "system", "value": recs[i]["system"]}]
        for r in recs[i:i + 3]:
            turns += [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]
        convs.append({"conversations": turns})
    train = tmp_path / "share.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in convs))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(convs[:4])}).save_to_disk(str(tmp_path / "evalset"))
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{
        "data.train_files": f"[{train}]", "data.eval_files": f"[{tmp_path / 'evalset'}]", "train.max_steps": "null",
        "train.epochs": 2, "train.micro_batch_size": 4, "data.max_length": 512})])
    assert "train data: 16 examples" in res.stdout and "eval data: 4 examples" in res.stdout
    assert "step 8: eval ce " in res.stdout and "top-1 agreement" in res.stdout  # eval on the console
    assert "4 optimizer steps per epoch" in res.stdout and "train.epochs=2.0: 8 optimizer steps" in res.stdout
    rows = metrics(out)
    assert rows[-1]["step"] == 8 and rows[-1]["train/epoch"] == 2.0 and "eval/ce" in rows[-1]
    # every assistant turn is trained: exactly the target tokens of the 48 records as single turns
    from kd.config import DataConfig
    from kd.data import build_datasets
    from kd.models import load_tokenizer

    single = build_datasets(DataConfig(train_files=[small_data["train"]], eval_fraction=0, store="off"),
                            load_tokenizer("builtin:tokenizer"), 0)[2]
    assert f"train data: 16 examples, {single.target_tokens} target tokens" in res.stdout
