"""On-policy distillation (kd/onpolicy.py): the student answers from its view, the teacher grades
from the strategy view; lambda = 0 is the off-policy run bitwise, resume is bitwise, ranks agree."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE, ROOT, free_port, run_cli, tiny_overrides
from kd.config import ConfigError, load_config
from kd.data.views import conversation_rows
from kd.models import load_model, load_tokenizer
from kd.onpolicy import OnPolicy, is_onpolicy

DEMO = "configs/demo.yaml"


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_on_policy_choice_is_a_pure_function_of_seed_step_and_micro_batch():
    assert not any(is_onpolicy(0, s, m, 0.0) for s in range(50) for m in range(4))
    assert all(is_onpolicy(0, s, m, 1.0) for s in range(50) for m in range(4))
    draws = [is_onpolicy(3, s, m, 0.3) for s in range(500) for m in range(4)]
    assert draws == [is_onpolicy(3, s, m, 0.3) for s in range(500) for m in range(4)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws != [is_onpolicy(4, s, m, 0.3) for s in range(500) for m in range(4)]


def test_generated_ids_are_the_target_of_both_views():
    cfg = load_config(DEMO, ["onpolicy.fraction=1", "onpolicy.max_new_tokens=6", "data.max_length=200"])
    tok = load_tokenizer("builtin:tokenizer")
    student = load_model("builtin:tiny-student", torch.float32, None, "student")
    recs = [json.loads(line) for line in open(ROOT / "data/demo/train.jsonl")][:3]
    chat = {"messages": [{"role": "system", "content": recs[0]["system"]},
                         {"role": "user", "content": recs[0]["prompt"]}, {"role": "assistant", "content": "first"},
                         {"role": "user", "content": recs[1]["prompt"]}, {"role": "assistant", "content": "second"}]}
    rows = [conversation_rows(r, tok, erase=True, generic_system="You are a helpful assistant.",
                              targets="all_assistant", max_length=200, min_prompt=8)[0][0] for r in [*recs, chat]]
    op = OnPolicy(cfg, tok)
    batch, stats = op.batch(student, rows, step=0, micro=0, rank=0)
    assert stats.sequences == 4 and 4 <= stats.tokens <= 24 and stats.longest <= 6
    labels = batch["labels"]
    t_ids, s_ids = batch["teacher_input_ids"].flatten(), batch["student_input_ids"].flatten()
    assert torch.equal(t_ids[batch["teacher_index"] + 1], labels)
    assert torch.equal(s_ids[batch["student_index"] + 1], labels)
    # the teacher's context holds the strategy instruction, the student's the generic one
    for b, rec in enumerate(recs):
        t_text = tok.decode(batch["teacher_input_ids"][b])
        s_text = tok.decode(batch["student_input_ids"][b])
        assert rec["system"] in t_text and rec["system"] not in s_text and "You are a helpful assistant." in s_text
    # a multi-turn example keeps its earlier turns as context: only the last turn is answered anew
    assert "first" in tok.decode(batch["student_input_ids"][3]) and "second" not in tok.decode(batch["student_input_ids"][3])
    assert len(batch["n_response"]) == 4
    # repeatable: the same step and micro-batch draw the same answers
    again, _ = op.batch(student, rows, step=0, micro=0, rank=0)
    assert torch.equal(again["labels"], labels)
    other, _ = op.batch(student, rows, step=1, micro=0, rank=0)
    assert not torch.equal(other["labels"], labels) or other["labels"].numel() != labels.numel()


def test_lambda_zero_is_the_off_policy_run_bitwise_and_lambda_one_has_no_ce(small_data, tmp_path):
    extra = {"train.max_steps": 3, "onpolicy.max_new_tokens": 16}
    off, zero, one = tmp_path / "off", tmp_path / "zero", tmp_path / "one"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, off, **extra)])
    run_cli(["--config", DEMO, *tiny_overrides(small_data, zero, **extra, **{"onpolicy.fraction": 0.0})])
    a, b = load_file(str(off / "student/model.safetensors")), load_file(str(zero / "student/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/loss"] for r in metrics(off)] == [r["train/loss"] for r in metrics(zero)]

    run_cli(["--config", DEMO, *tiny_overrides(small_data, one, **extra, **{"onpolicy.fraction": 1.0,
                                                                          "onpolicy.weight": 0.5})])
    rows = metrics(one)
    assert all(r["train/onpolicy_fraction"] == 1.0 and "train/ce" not in r for r in rows)
    t2 = load_config(DEMO).loss.temperature ** 2
    for r in rows:  # every token is the student's own: the loss is weight x T^2 x the divergence alone
        assert r["train/loss"] == pytest.approx(0.5 * t2 * r["train/onpolicy_kd"], rel=1e-5)
        assert 1 <= r["train/gen_len_mean"] <= r["train/gen_len_max"] <= 16
        assert 0 <= r["train/gen_stopped_by_length"] <= 1 and r["train/gen_tokens_per_s"] > 0
    c = load_file(str(one / "student/model.safetensors"))
    assert any(not torch.equal(c[k], a[k]) for k in a)  # the student's own answers trained it elsewhere


def test_resume_mid_run_is_bitwise_including_the_sampled_answers(small_data, tmp_path):
    extra = {"train.max_steps": 4, "train.save_every": 2, "onpolicy.fraction": 0.5, "onpolicy.temperature": 1.0,
             "onpolicy.max_new_tokens": 12}
    ref = tmp_path / "ref"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, ref, **extra)])
    assert any(r["train/onpolicy_fraction"] > 0 for r in metrics(ref))
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints/step_00000002", out / "checkpoints/step_00000002")
    (out / "checkpoints/latest").write_text("step_00000002")
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **extra)])
    assert "resumed from" in res.stdout
    a, b = load_file(str(ref / "student/model.safetensors")), load_file(str(out / "student/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("train/loss", "train/onpolicy_kd", "train/gen_len_mean")
    assert [[r.get(k) for k in keys] for r in metrics(out)] == [[r.get(k) for k in keys] for r in metrics(ref)[2:]]


def test_the_teacher_cache_is_refused():
    with pytest.raises(ConfigError, match="onpolicy.fraction > 0 needs the live teacher"):
        load_config(DEMO, ["onpolicy.fraction=0.5", "teacher.cache=/tmp/somewhere"])


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cpu_ddp2", "cpu_ds2_zero3"])
def test_two_ranks_with_uneven_answers_match_one_process(launch, small_data, tmp_path):
    """Greedy answers of different lengths on the two ranks: no hang, and the same run as one
    process with the same global batch. The student starts as a copy of the trained teacher, so
    it answers short (direct) and long (step-by-step) problems with answers of different lengths;
    it reads the erased view, so the teacher still disagrees with it."""
    extra = {"train.max_steps": 3, "train.grad_accum_steps": 1, "onpolicy.fraction": 1.0,
             "onpolicy.temperature": 0.0, "onpolicy.max_new_tokens": 40, "student.name_or_path": "builtin:tiny-teacher"}
    ref = tmp_path / "ref"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, ref, **extra, **{"train.micro_batch_size": 8})])
    out = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--config_file", f"launch/{launch}.yaml", "--main_process_port", str(free_port()),
           "--num_cpu_threads_per_process", "1", "kd/train.py", "--config", DEMO, *tiny_overrides(small_data, out, **extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    got, want = metrics(out), metrics(ref)
    assert [r["train/gen_len_mean"] for r in got] == pytest.approx([r["train/gen_len_mean"] for r in want])
    assert any(r["train/gen_len_max"] > r["train/gen_len_mean"] for r in got)  # lengths differ within the batch
    for r, w in zip(got, want, strict=True):
        assert r["train/loss"] > 0 and r["train/loss"] == pytest.approx(w["train/loss"], rel=1e-5)


# --------------------------------------------------------------------------- the warm-start curriculum


def test_the_schedule_is_off_until_start_step_then_ramps_to_fraction():
    o = load_config(DEMO, ["onpolicy.fraction=0.5", "onpolicy.start_step=10", "onpolicy.ramp_steps=4"]).onpolicy
    assert [o.lam(s) for s in (0, 9, 10, 11, 12, 13, 14, 500)] == [0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    plain = load_config(DEMO, ["onpolicy.fraction=0.3"]).onpolicy
    assert all(plain.lam(s) == 0.3 for s in range(20))  # the default schedule: today's constant lambda
    with pytest.raises(ConfigError, match="onpolicy.fraction is 0"):
        load_config(DEMO, ["onpolicy.start_step=10"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(DEMO, ["onpolicy.fraction=0.5", "onpolicy.ramp_steps=-1"])


def test_a_start_step_is_the_off_policy_run_until_then_and_resumes_bitwise_across_the_switch(small_data, tmp_path):
    """Steps 1-2 off-policy (weights and losses equal the plain off-policy run), step 3 at lambda 0.5,
    step 4 at 1; a run killed at step 2 (before the switch) resumes to the same weights."""
    extra = {"train.max_steps": 4, "train.save_every": 2, "train.keep_checkpoints": 2, "onpolicy.max_new_tokens": 12}
    curriculum = {"onpolicy.fraction": 1.0, "onpolicy.start_step": 2, "onpolicy.ramp_steps": 2}
    off, cur = tmp_path / "off", tmp_path / "curriculum"
    run_cli(["--config", DEMO, *tiny_overrides(small_data, off, **extra)])
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, cur, **extra, **curriculum)])
    assert "on-policy 100% of micro-batches from step 3, rising over 2 steps" in res.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(off / "checkpoints/step_00000002" / name))
        b = load_file(str(cur / "checkpoints/step_00000002" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_off, m_cur = metrics(off), metrics(cur)
    assert [r["train/loss"] for r in m_off[:2]] == [r["train/loss"] for r in m_cur[:2]]
    assert [r["train/onpolicy_lambda"] for r in m_cur] == [0.0, 0.0, 0.5, 1.0]
    assert [r["train/onpolicy_fraction"] for r in m_cur][:2] == [0.0, 0.0] and m_cur[3]["train/onpolicy_fraction"] == 1
    a, b = load_file(str(off / "student/model.safetensors")), load_file(str(cur / "student/model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(cur / "checkpoints/step_00000002", out / "checkpoints/step_00000002")
    (out / "checkpoints/latest").write_text("step_00000002")
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **extra, **curriculum)])
    assert "resumed from" in res.stdout
    c = load_file(str(out / "student/model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    keys = ("train/loss", "train/onpolicy_kd", "train/gen_len_mean", "train/onpolicy_lambda")
    assert [[r.get(k) for k in keys] for r in metrics(out)] == [[r.get(k) for k in keys] for r in m_cur[2:]]


# --------------------------------------------------------------------------- collapse guards


def test_a_template_whose_turns_end_on_no_stop_token_is_refused_in_one_line(small_data, tmp_path):
    """The demo template with `</s>` closing each turn: the tokenizer's eos is `<|im_end|>`, so the
    student's answers could never stop before the budget."""
    template = tmp_path / "no_stop.jinja"
    tok = load_tokenizer("builtin:tokenizer")
    template.write_text(tok.chat_template.replace("<|im_end|>", "</s>"))
    out = tmp_path / "run"
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, out, **{"onpolicy.fraction": 0.5,
                                                                      "data.chat_template": str(template)})],
                  check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd: error: on-policy:") and "'</s>'" in err[0]
    assert "does not know" in err[0] and "eos_token_id" in err[0] and "Traceback" not in res.stderr
    # the same template off-policy is fine: nothing is generated
    run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "off", **{"data.chat_template": str(template)})])


def test_a_student_that_never_ends_its_turn_is_warned_about_once(small_data, tmp_path):
    """The random-init student runs every answer to a 4-token budget: after 2 logged steps with more
    than half cut, one warning saying what to do; a warned run still trains (it is a warning)."""
    extra = {"train.max_steps": 4, "onpolicy.fraction": 1.0, "onpolicy.max_new_tokens": 4,
             "onpolicy.warn_cut_steps": 2, "onpolicy.warn_cut_share": 0.5}
    res = run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "run", **extra)])
    assert all(r["train/gen_stopped_by_length"] > 0.5 for r in metrics(tmp_path / "run"))
    lines = [line for line in res.stdout.splitlines() if "ran to onpolicy.max_new_tokens=4" in line]
    assert len(lines) == 1 and lines[0].startswith("step 2:") and "onpolicy.start_step" in lines[0]
    quiet = run_cli(["--config", DEMO, *tiny_overrides(small_data, tmp_path / "quiet",
                                                     **{**extra, "onpolicy.warn_cut_steps": 0})])
    assert "ran to onpolicy.max_new_tokens" not in quiet.stdout


def test_the_cut_watch_counts_only_steps_that_generated():
    from kd.onpolicy import CutWatch

    w = CutWatch(load_config(DEMO, ["onpolicy.fraction=0.5", "onpolicy.warn_cut_steps=3"]).onpolicy)
    seen = [w.see(s, row) for s, row in enumerate([{"train/gen_stopped_by_length": 0.9}, {},
                                                   {"train/gen_stopped_by_length": 0.8},
                                                   {"train/gen_stopped_by_length": 0.2},  # breaks the run
                                                   {"train/gen_stopped_by_length": 0.6}, {},
                                                   {"train/gen_stopped_by_length": 0.7},
                                                   {"train/gen_stopped_by_length": 0.9},
                                                   {"train/gen_stopped_by_length": 1.0}], 1)]
    assert [s is not None for s in seen] == [False] * 7 + [True, False]
