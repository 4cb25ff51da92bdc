"""kd.plan: the arithmetic, and its estimate against measured peak memory of 2-rank DeepSpeed runs."""

from __future__ import annotations

import json
import subprocess

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import ACCELERATE, PY, ROOT, free_port
from kd.demo import builtin
from kd.config import load_config
from kd.tools.plan import GiB, plan

BIG = "configs/llama2-70b-to-7b.yaml"


def total(rows):
    return sum(b for _, b in rows)


def test_70b_plan_fits_on_8x80gb_and_sharding_helps():
    cfg = load_config(ROOT / BIG)
    z2, z3 = total(plan(cfg, 8, 1, 2)), total(plan(cfg, 8, 1, 3))
    assert z3 < z2 < 75 * GiB
    teacher = dict(plan(cfg, 8, 1, 2))["teacher weights (ZeRO-3 shard)"]
    assert teacher == pytest.approx(68.98e9 * 2 / 8, rel=0.01)  # LLaMA-2-70B in bf16, one eighth
    assert total(plan(cfg, 8, 2, 3)) < z3  # more nodes, smaller shards
    replicated = load_config(ROOT / BIG, ["teacher.zero3=false"])
    assert total(plan(replicated, 8, 1, 2)) > 80 * GiB  # what peers do: does not fit


def test_lora_shrinks_the_trainable_states_but_keeps_the_frozen_weights():
    cfg = load_config(ROOT / BIG)
    lora = load_config(ROOT / BIG, ["student.lora.rank=16"])
    full, small = dict(plan(cfg, 8, 1, 2)), dict(plan(lora, 8, 1, 2))
    # every frozen weight stays (plus the adapters themselves)
    assert full["student weights"] < small["student weights"] < 1.01 * full["student weights"]
    opt = next(v for k, v in small.items() if k.startswith("student optimizer states"))
    assert opt < full["student optimizer states (partitioned)"] / 50  # ~40M adapter params vs 6.7B
    assert total(plan(lora, 8, 1, 2)) < total(plan(cfg, 8, 1, 2))
    # exact count on the tiny student: r * (in + out) for every linear layer of the decoder
    from kd.tools.plan import model_shape

    shape = model_shape("builtin:tiny-student", load_config(ROOT / "configs/demo.yaml", ["student.lora.rank=4"]).student.lora)
    assert shape.trainable == 10_240 and not shape.head_trains  # as the trainer reports for this student


def test_cli_prints_the_verdict():
    res = subprocess.run([PY, "-m", "kd.plan", "--config", BIG, "--gpus", "8", "--nodes", "1", "--gpu-memory", "80"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "teacher weights (ZeRO-3 shard)" in res.stdout and "fits in 80 GiB" in res.stdout


def test_plans_other_architectures_offline_and_refuses_what_it_cannot(tmp_path):
    from transformers import GPT2Config, GPTNeoXConfig

    from kd.tools.plan import model_shape

    GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "gpt2")
    GPTNeoXConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, intermediate_size=128,
                  vocab_size=300).save_pretrained(tmp_path / "neox")
    gpt2, neox = model_shape(str(tmp_path / "gpt2")), model_shape(str(tmp_path / "neox"))
    assert (gpt2.layers, gpt2.hidden, gpt2.intermediate, gpt2.vocab_rows) == (3, 64, 256, 300)
    assert (neox.layers, neox.intermediate) == (5, 128)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "t5", "d_model": 8, "num_layers": 1}')
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(f"teacher: {{name_or_path: {tmp_path / 'odd'}}}\nstudent: {{name_or_path: {tmp_path / 'gpt2'}}}\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}  # local dirs need no hub
    res = subprocess.run([PY, "-m", "kd.plan", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("kd: error: kd.plan cannot plan") and len(res.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory):
    """~57M teacher and ~26M student: big enough that tensors dominate the CPU runtime's noise."""
    d = tmp_path_factory.mktemp("mid")
    tok = AutoTokenizer.from_pretrained(builtin.resolve("builtin:tokenizer"))
    for name, h, inter in (("teacher", 768, 2048), ("student", 512, 1376)):
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=inter, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def measured_and_planned(models, out, batch):
    over = [f"teacher.name_or_path={models / 'teacher'}", f"student.name_or_path={models / 'student'}",
            "data.max_length=256", f"train.micro_batch_size={batch}"]
    run = over + [f"train.output_dir={out}", "train.max_steps=3", "train.eval_every=0", "train.save_every=0",
                  "train.export=false", "data.eval_files=[]", "data.eval_fraction=0", "log.progress_bar=false"]
    res = subprocess.run([ACCELERATE, "launch", "--config_file", "launch/cpu_ds2_zero2.yaml", "--main_process_port",
                          str(free_port()), "--num_cpu_threads_per_process", "1", "kd/train.py",
                          "--config", "configs/demo.yaml", *run], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    measured = (last["sys/peak_mem_gib"] - last["sys/base_mem_gib"]) * GiB
    planned = total(plan(load_config(ROOT / "configs/demo.yaml", over), gpus=2, student_zero=2, gpu=False))
    return measured, planned


@pytest.mark.slow
def test_plan_matches_measured_peak_memory_on_cpu(mid_models, tmp_path):
    """Stated tolerance: the batch-dependent part (activations, logits) within 25%; the absolute
    estimate below the measured RSS by at most 0.6 GiB, the CPU runtime's own overhead (mapped
    checkpoint files, gloo/DeepSpeed buffers, allocator caching) that the GPU plan's reserve covers."""
    m2, p2 = measured_and_planned(mid_models, tmp_path / "b2", 2)
    m8, p8 = measured_and_planned(mid_models, tmp_path / "b8", 8)
    assert (m8 - m2) == pytest.approx(p8 - p2, rel=0.25)
    for m, p in ((m2, p2), (m8, p8)):
        assert 0 <= m - p <= 0.6 * GiB, (m / GiB, p / GiB)
