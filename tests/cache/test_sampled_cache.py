"""The sampled teacher cache (`kd.cache --format sampled`): what is stored equals the draws made from
the live teacher, independent of batching and sharding; the cached loss equals the loss on those
draws, packed or padded; a loss the cache cannot serve is refused at open; and the real CLI builds
one and trains from it (the estimator's statistics: tests/loss/test_sampled.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE, ROOT, free_port, tiny_overrides
from kd.cache.build import build_cache, example_generator
from kd.cache.store import CacheError, TeacherCache
from kd.cache.teacher import CachedDistiller
from kd.config import load_config
from kd.data import build_datasets, collate, collate_packed
from kd.forward import fp32_logits, head, teacher_forward
from kd.loss import LossSpec
from kd.loss.sampled import sampled_kd_loss, teacher_sample
from kd.models import load_student, load_teacher, load_tokenizers

DEMO = str(ROOT / "configs/demo.yaml")
DRAWS, TEMPS = 16, (1.0, 2.0)


def sixteen(small_data, path, **extra):
    """The 16 eval records as training data, with no eval split: builds here are quick."""
    return load_config(DEMO, tiny_overrides(small_data, path.parent / "run", **{
        "teacher.cache": str(path), "data.train_files": f"[{small_data['eval']}]", "data.eval_files": "[]",
        "data.eval_fraction": 0, **extra}))


@pytest.fixture(scope="module")
def sampled(small_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("sampled") / "cache"
    cfg = sixteen(small_data, path)
    build_cache(cfg, cache_format="sampled", draws=DRAWS, tail_temperatures=TEMPS, proposal_temperature=2.0,
                shard_examples=5, sample_seed=3, log=lambda *a: None)
    tok = load_tokenizers(cfg)
    train, _, _, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    return cfg, path, tok, train


def test_stored_draws_are_the_live_teachers_seeded_draws(sampled):
    cfg, path, tok, train = sampled
    v = len(tok)
    cache = TeacherCache.open(cfg, tok, train, None)
    teacher = load_teacher(cfg, v, "cpu")
    exs = [train[i] for i in (7, 2, 11)]  # not the builder's batches or shards
    batch = collate(exs, tok.pad_token_id)
    got = cache.lookup(batch, "train")
    logits = fp32_logits(teacher_forward(teacher, batch), head(teacher))
    start = 0
    for e in exs:
        n = e["n_response"]
        want = teacher_sample(logits[start:start + n], DRAWS, v, TEMPS, proposal=2.0,
                              generator=example_generator(3, e["example_id"], "cpu"))
        u = want.ids.shape[1]
        rows = slice(start, start + n)
        assert torch.equal(got.ids[rows, :u], want.ids) and torch.equal(got.freq[rows, :u], want.freq)
        assert not got.freq[rows, u:].any()  # padding carries no weight
        torch.testing.assert_close(got.logq[rows, :u], want.logq, rtol=1e-3, atol=1e-3)  # fp16 on disk
        torch.testing.assert_close(got.log_norm[rows], want.log_norm, rtol=0, atol=1e-6)
        start += n
    assert got.temperatures.tolist() == [2.0, 1.0] and got.proposal.tolist() == [2.0]
    m = json.loads((path / "manifest.json").read_text())
    assert m["cache_format"] == "sampled" and m["draws"] == DRAWS and "k" not in m
    shard = load_file(path / "train-00000.safetensors")
    assert shard["counts"].dtype == torch.uint8 and shard["logq"].dtype == torch.float16
    assert shard["ids"].dtype == torch.int16 and shard["log_norm"].shape[1] == 1  # T = 1 only: c_2 = 0
    assert int(shard["counts"].long().sum()) == DRAWS * int(shard["n_unique"].numel())


def test_draws_depend_on_the_example_not_on_how_the_build_was_sharded(sampled, small_data, tmp_path):
    cfg, path, tok, train = sampled
    other = tmp_path / "one-shard"
    build_cache(sixteen(small_data, other), cache_format="sampled", draws=DRAWS, tail_temperatures=TEMPS,
                proposal_temperature=2.0, shard_examples=16, sample_seed=3, log=lambda *a: None)
    a = TeacherCache.open(cfg, tok, train, None)
    b = TeacherCache(other, json.loads((other / "manifest.json").read_text()))
    batch = collate([train[i] for i in range(16)], tok.pad_token_id)
    x, y = a.lookup(batch, "train"), b.lookup(batch, "train")
    # other batches give the teacher's logits in another fp32 summation order (differences ~1e-7),
    # which can move a draw that falls on a boundary of the cumulative distribution: rare
    same = (x.ids == y.ids).all(-1) & (x.freq == y.freq).all(-1) if x.ids.shape == y.ids.shape else None
    assert same is not None and same.float().mean() > 0.99, same
    torch.testing.assert_close(x.log_norm, y.log_norm, rtol=0, atol=1e-5)


def test_cached_loss_is_the_loss_on_the_draws_packed_or_padded(sampled):
    cfg, _, tok, train = sampled
    v = len(tok)
    cache = TeacherCache.open(cfg, tok, train, None)
    exs = [train[i] for i in (3, 0, 7, 12, 5)]
    spec = LossSpec(v, alpha=0.3, temperature=2.0, chunk_size=37)
    out = []
    for batch in (collate(exs, tok.pad_token_id), collate_packed(exs)):
        student = load_student(cfg, v, "cpu")
        rows = cache.lookup(batch, "train")
        parts = CachedDistiller(student, spec)(batch, rows)
        parts["weighted_sum"].backward()
        out.append((parts, [p.grad.clone() for p in student.parameters()], rows))
    (a, ga, rows), (b, gb, _) = out
    for key in ("weighted_sum", "ce_sum", "kd_sum"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    # the chunked module computes the pure loss on the same rows
    student = load_student(cfg, v, "cpu")
    batch = collate(exs, tok.pad_token_id)
    from kd.forward import response_hidden

    ref = sampled_kd_loss(fp32_logits(response_hidden(student, batch, "student"), head(student)), rows,
                          batch["labels"], spec)
    torch.testing.assert_close(a["kd_sum"], ref.kd_sum, rtol=1e-5, atol=1e-5)


def test_a_loss_the_cache_cannot_serve_is_refused_at_open(sampled, small_data):
    cfg, path, tok, train = sampled
    for extra, message in ((["loss.divergence=reverse_kl"], "unbiased only for forward KL"),
                           (["loss.temperature=3.0"], "serves temperatures 2, 1, not loss.temperature=3")):
        bad = load_config(DEMO, tiny_overrides(small_data, path.parent / "run", **{
            "teacher.cache": str(path), "data.train_files": f"[{small_data['eval']}]", "data.eval_files": "[]",
            "data.eval_fraction": 0}) + extra)
        with pytest.raises(CacheError, match=message):
            TeacherCache.open(bad, tok, train, None)
    ce_only = load_config(DEMO, tiny_overrides(small_data, path.parent / "run", **{
        "teacher.cache": str(path), "data.train_files": f"[{small_data['eval']}]", "data.eval_files": "[]",
        "data.eval_fraction": 0}) + ["loss.alpha=1.0", "loss.divergence=tvd"])
    TeacherCache.open(ce_only, tok, train, None)


def test_a_temperature_above_the_proposals_is_refused_at_build(small_data, tmp_path):
    with pytest.raises(CacheError, match="cannot serve T = 2.*raise --proposal-temperature"):
        build_cache(sixteen(small_data, tmp_path / "c"), cache_format="sampled", draws=4, tail_temperatures=(1.0, 2.0),
                    log=lambda *a: None)


def test_the_cli_builds_a_sampled_cache_and_trains_and_evaluates_from_it(small_data, tmp_path):
    cache = tmp_path / "cache"
    base = tiny_overrides(small_data, tmp_path / "run", **{"train.eval_every": 2, "log.tracker": "none",
                                                           "train.export": "false"})
    res = subprocess.run([sys.executable, "-m", "kd.cache", "--config", DEMO, *base, f"teacher.cache={cache}",
                          "--format", "sampled", "--draws", "8", "--proposal-temperature", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bytes/token" in res.stdout and "8 draws at T=2" in res.stdout
    res = subprocess.run([sys.executable, "-m", "kd.train", "--config", DEMO, *base, f"teacher.cache={cache}",
                          "loss.temperature=2.0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "cached 8 samples per token (T=2; serves T = 2, 1)" in res.stdout + res.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/kd" in r]
    assert evals and all(torch.isfinite(torch.tensor(r["eval/kd"])) for r in evals)
    res = subprocess.run([sys.executable, "-m", "kd.train", "--config", DEMO, *base, f"teacher.cache={cache}",
                          "loss.divergence=jsd", f"train.output_dir={tmp_path / 'jsd'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "unbiased only for forward KL" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_ranks_build_the_same_shards_and_train_from_them(sampled, small_data, tmp_path):
    _, ref, _, _ = sampled
    path = tmp_path / "two-ranks"
    over = tiny_overrides(small_data, tmp_path / "run", **{
        "teacher.cache": str(path), "data.train_files": f"[{small_data['eval']}]", "data.eval_files": "[]",
        "data.eval_fraction": 0, "log.tracker": "none", "train.export": "false"})
    launch = [ACCELERATE, "launch", "--config_file", "launch/cpu_ddp2.yaml", "--main_process_port", str(free_port()),
              "--num_cpu_threads_per_process", "1"]
    res = subprocess.run([*launch, "-m", "kd.cache", "--config", DEMO, *over, "--format", "sampled", "--draws",
                          str(DRAWS), "--proposal-temperature", "2", "--tail-temperatures", "1,2", "--shard-examples",
                          "5", "--sample-seed", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0] train-00000" in res.stdout and "[rank 1] train-00001" in res.stdout
    for name in ("train-00000", "train-00001", "train-00002", "train-00003"):  # the same draws on either rank
        a, b = load_file(path / f"{name}.safetensors"), load_file(ref / f"{name}.safetensors")
        exact = ("ids", "counts", "n_unique", "example_ids", "offsets")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in exact), name
        # the log-sum-exps behind log q and c_T are reduced in another order at another thread count
        # (the ranks run one thread, this process may run more): equal to rounding, not bitwise
        torch.testing.assert_close(a["log_norm"], b["log_norm"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["logq"].float(), b["logq"].float(), rtol=1e-3, atol=1e-3)
    launch[5] = str(free_port())
    res = subprocess.run([*launch, "kd/train.py", "--config", DEMO, *over, "loss.temperature=2.0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
