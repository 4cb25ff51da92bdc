"""Teacher-logit cache: what is stored, the cached Distiller against the live one, manifest checks,
and builds that are interrupted and resumed (the loss math itself: tests/loss/test_topk.py)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load, load_file

from conftest import ACCELERATE, ROOT, free_port, tiny_overrides
import kd.cache.build
from kd.cache.build import build_cache
from kd.cache.store import CacheError, TeacherCache
from kd.cache.teacher import CachedDistiller
from kd.config import load_config
from kd.data import build_datasets, collate, collate_packed
from kd.forward import Distiller, fp32_logits, head, teacher_forward
from kd.loss import LossSpec
from kd.loss.topk import bucket_logprobs
from kd.models import load_student, load_teacher, load_tokenizer, load_tokenizers

DEMO = str(ROOT / "configs/demo.yaml")
K, SHARD, MB = 16, 20, 4


def config(small_data, path, **extra):
    return load_config(DEMO, tiny_overrides(small_data, path.parent / "run", **{"teacher.cache": str(path), **extra}))


def sixteen(small_data, path, **extra):
    """Only the 16 eval records, as training data: for builds a test repeats."""
    return config(small_data, path, **{"data.train_files": f"[{small_data['eval']}]", "data.eval_files": "[]",
                                       "data.eval_fraction": 0, **extra})


def datasets(cfg, tok=None):
    tok = tok or load_tokenizers(cfg)
    train, evald, _, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    return tok, train, evald


@pytest.fixture(scope="module")
def built(small_data, tmp_path_factory):
    """A k=16 cache of small_data (3 train shards, 1 eval shard), built in this process."""
    path = tmp_path_factory.mktemp("cache") / "k16"
    cfg = config(small_data, path)
    build_cache(cfg, k=K, shard_examples=SHARD, log=lambda *a: None)
    return cfg, path


def test_round_trip_topk_exact_and_tail_mass_exact_at_t1(built):
    cfg, path = built
    tok, train, evald = datasets(cfg)
    cache = TeacherCache.open(cfg, tok, train, evald)
    teacher = load_teacher(cfg, len(tok), "cpu")
    v = len(tok)
    checked = 0
    # train shard 1 (a middle one) and the eval shard, in the builder's own batches (bitwise equal logits)
    for split, ds, start in (("train", train, SHARD), ("eval", evald, 0)):
        shard = list(ds.select(range(start, min(len(ds), start + SHARD))))
        for b in range(0, len(shard), MB):
            batch = collate(shard[b:b + MB], tok.pad_token_id)
            logits = fp32_logits(teacher_forward(teacher, batch), head(teacher))[:, :v]
            got = cache.lookup(batch, split)
            top = logits.topk(K, dim=-1)
            assert torch.equal(got.ids, top.indices) and torch.equal(got.logits, top.values)
            # the tail bucket holds the exact mass of the other V - k tokens at T = 1
            tail = logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
            assert got.tail_temperatures.tolist() == [1.0, 2.0, 4.0, 8.0]
            torch.testing.assert_close(got.tail_lse[:, 0], tail, rtol=0, atol=1e-6)
            for t in (1.0, 2.0):  # stored tail temperatures: re-tempered and renormalised exactly
                t_logp, _ = bucket_logprobs(torch.zeros_like(logits), got.ids, got.logits, got.tail_lse,
                                               vocab_size=v, temperature=t, tail_temperatures=got.tail_temperatures)
                live = (logits / t).log_softmax(-1)
                torch.testing.assert_close(t_logp[:, :K], live.gather(-1, top.indices), rtol=0, atol=1e-5)
                live_tail = live.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
                torch.testing.assert_close(t_logp[:, K], live_tail, rtol=0, atol=1e-5)
            checked += got.ids.shape[0]
    m = json.loads((path / "manifest.json").read_text())
    assert m["complete"] and m["k"] == K and checked > 1000
    assert m["splits"]["train"]["examples"] == 48 and m["splits"]["eval"]["examples"] == 16
    assert sorted(p.name for p in path.iterdir()) == [
        "eval-00000.safetensors", "manifest.json", *(f"train-0000{i}.safetensors" for i in range(3))]


def test_cached_training_is_the_same_packed_or_padded(built):
    cfg, _ = built
    tok, train, evald = datasets(cfg)
    cache = TeacherCache.open(cfg, tok, train, evald)
    exs = [train[i] for i in (3, 0, 7, 12, 5)]
    spec = LossSpec(len(tok), alpha=0.3, temperature=2.0, chunk_size=37)
    out = []
    for batch in (collate(exs, tok.pad_token_id), collate_packed(exs)):
        student = load_student(cfg, len(tok), "cpu")
        parts = CachedDistiller(student, spec)(batch, cache.lookup(batch, "train"))
        parts["weighted_sum"].backward()
        out.append((parts, [p.grad.clone() for p in student.parameters()]))
    (a, ga), (b, gb) = out
    for key in ("weighted_sum", "ce_sum", "kd_sum"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_cached_distiller_equals_live_distiller_when_k_is_the_vocabulary(small_data, tmp_path):
    # 16 examples are enough: one batch through both modules, values and student gradients compared
    path = tmp_path / "full"
    cfg = sixteen(small_data, path)
    tok = load_tokenizers(cfg)
    v = len(tok)
    build_cache(cfg, k=v, shard_examples=8, log=lambda *a: None)
    _, train, _ = datasets(cfg, tok)
    cache = TeacherCache.open(cfg, tok, train, None)
    teacher = load_teacher(cfg, v, "cpu")
    batch = collate([train[i] for i in (3, 0, 7, 12, 5)], tok.pad_token_id)  # not the builder's batching
    for spec in (LossSpec(v, alpha=0.2, temperature=2.0, divergence="jsd"),
                 LossSpec(v, alpha=0.5, temperature=4.0, implementation="chunked", chunk_size=37)):
        live_student, cached_student = load_student(cfg, v, "cpu"), load_student(cfg, v, "cpu")
        live = Distiller(live_student, spec)(batch, teacher_forward(teacher, batch), head(teacher))
        got = CachedDistiller(cached_student, spec)(batch, cache.lookup(batch, "train"))
        live["weighted_sum"].backward()
        got["weighted_sum"].backward()
        for key in ("weighted_sum", "ce_sum", "kd_sum"):
            torch.testing.assert_close(got[key], live[key], rtol=1e-5, atol=1e-5, msg=key)
        for (name, a), b in zip(live_student.named_parameters(), cached_student.parameters()):
            # fp32 summation order differs (cache: stored logits; live: fresh projection), so the
            # absolute tolerance scales with the tensor: the trained teacher's peaked logits at
            # T = 4 give embedding gradients of ~200, where 1e-6 absolute is below fp32 rounding.
            scale = max(1.0, a.grad.abs().max().item())
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_a_cache_that_does_not_match_the_run_is_refused(built, small_data):
    cfg, path = built
    tok, train, evald = datasets(cfg)

    def refused(run_cfg, message, tok=tok, train=train, evald=evald):
        with pytest.raises(CacheError, match=message):
            TeacherCache.open(run_cfg, tok, train, evald)

    shorter = config(small_data, path, **{"data.max_length": 200})
    refused(shorter, r"built with data.max_length=256, this run has data.max_length=200")
    fewer = config(small_data, path, **{"data.min_prompt_tokens": 4})
    refused(fewer, r"data.min_prompt_tokens=8, this run has data.min_prompt_tokens=4")
    other = config(small_data, path, **{"data.train_files": f"[{small_data['eval']}]"})
    _, other_train, _ = datasets(other, tok)
    refused(other, r"built from different data: train split fingerprint differs", train=other_train)
    refused(config(small_data, path, **{"teacher.name_or_path": "some/other-teacher"}),
            r"holds the logits of teacher 'builtin:tiny-teacher', but teacher.name_or_path is 'some/other-teacher'")
    bigger = load_tokenizer(cfg.student.name_or_path)
    bigger.add_tokens(["<extra-token>"])
    refused(cfg, rf"different tokenizer .* than this run's \('builtin:tiny-student', {len(tok) + 1} tokens\)",
            tok=bigger)
    refused(config(small_data, path.parent / "nothing-here"), r"no manifest.json there; build it with")
    # building into a directory that holds another cache is refused too
    with pytest.raises(CacheError, match=r"already holds a cache built with other settings \(k: 16 -> 32"):
        build_cache(cfg, k=32, shard_examples=SHARD, log=lambda *a: None)


def test_interrupted_build_resumes_skipping_finished_shards(small_data, tmp_path, monkeypatch):
    ref, path = tmp_path / "uninterrupted", tmp_path / "resumed"
    build_cache(sixteen(small_data, ref), k=K, shard_examples=5, log=lambda *a: None)
    cfg = sixteen(small_data, path)
    real_write = kd.cache.build._write_shard
    written = []

    def dies_on_second_shard(target, tensors, metadata):
        if written:  # killed while writing: only a hidden temporary file exists
            (target.parent / f".{target.name}.12345.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(target, tensors, metadata)
        written.append(target)

    monkeypatch.setattr(kd.cache.build, "_write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, k=K, shard_examples=5, log=lambda *a: None)
    monkeypatch.setattr(kd.cache.build, "_write_shard", real_write)
    first = path / "train-00000.safetensors"
    assert written == [first] and not (path / "train-00001.safetensors").exists()
    stamp = os.stat(first)
    tok, train, _ = datasets(cfg)
    with pytest.raises(CacheError, match="incomplete"):
        TeacherCache.open(cfg, tok, train, None)

    build_cache(cfg, k=K, shard_examples=5, log=lambda *a: None)
    again = os.stat(first)
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)  # skipped, not rewritten
    # the stale temporary file is gone, and the shards equal an uninterrupted build's
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", *(f"train-0000{i}.safetensors" for i in range(4))]
    for i in range(4):
        a, b = load_file(path / f"train-0000{i}.safetensors"), load_file(ref / f"train-0000{i}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), i
    TeacherCache.open(cfg, tok, train, None)

    # a rerun with nothing left to do does not even load the teacher
    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr("kd.models.load_model", no_teacher)
    assert build_cache(cfg, k=K, shard_examples=5, log=lambda *a: None)["complete"]


@pytest.mark.slow
def test_two_ranks_write_their_own_shards_equal_to_one_process(built, small_data, tmp_path):
    _, ref = built
    path = tmp_path / "two-ranks"
    overrides = tiny_overrides(small_data, tmp_path / "run", **{"teacher.cache": str(path)})
    res = subprocess.run([ACCELERATE, "launch", "--config_file", "launch/cpu_ddp2.yaml", "--main_process_port",
                          str(free_port()), "--num_cpu_threads_per_process", "1", "-m", "kd.cache", "--config", DEMO,
                          *overrides, "--k", str(K), "--shard-examples", str(SHARD)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0] train-00000" in res.stdout and "[rank 1] train-00001" in res.stdout
    assert json.loads((path / "manifest.json").read_text())["complete"]
    for name in ("train-00000", "train-00001", "train-00002", "eval-00000"):
        a, b = load_file(path / f"{name}.safetensors"), load_file(ref / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_a_damaged_cache_is_refused_and_its_rerun_rebuilds_only_the_damage(small_data, tmp_path):
    path = tmp_path / "c"
    cfg = sixteen(small_data, path)
    build_cache(cfg, k=K, shard_examples=5, log=lambda *a: None)
    tok, train, _ = datasets(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [f"train-0000{i}.safetensors" for i in range(4)]
    TeacherCache.open(cfg, tok, train, None)
    good = {f.name: f.read_bytes() for f in path.glob("*.safetensors")}
    # finite corruption of one stored logit: the file stays valid safetensors of the same size
    shard = path / "train-00002.safetensors"
    tensors = load_file(shard)
    tensors["logits"][3, 0] += 1.0
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    from safetensors.torch import save as to_bytes

    changed = to_bytes(tensors, metadata=json.loads(raw[8:header])["__metadata__"])
    assert len(changed) == len(raw)
    shard.write_bytes(changed)
    with pytest.raises(CacheError, match=r"is damaged: train-00002.safetensors does not match its checksum; "
                                         r"rerun the same kd.cache command"):
        TeacherCache.open(cfg, tok, train, None)
    said = []
    build_cache(cfg, k=K, shard_examples=5, log=said.append)
    assert any("train-00002.safetensors does not match its checksum; rebuilding that shard" in s for s in said)
    now = {f.name: f.read_bytes() for f in path.glob("*.safetensors")}
    # untouched shards are not rewritten; the rebuilt one holds the original tensors (its bytes may
    # differ: safetensors writes the metadata keys in no fixed order)
    assert {n: b for n, b in now.items() if n != shard.name} == {n: b for n, b in good.items() if n != shard.name}
    rebuilt, original = load_file(shard), load(good[shard.name])
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)
    TeacherCache.open(cfg, tok, train, None)
    # a manifest from before checksums were recorded: refused until a rerun adds them
    old = json.loads((path / "manifest.json").read_text())
    del old["files"]
    (path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(CacheError, match="no checksums"):
        TeacherCache.open(cfg, tok, train, None)
    build_cache(cfg, k=K, shard_examples=5, log=lambda *a: None)
    TeacherCache.open(cfg, tok, train, None)
