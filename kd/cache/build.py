"""Build a teacher cache: run the teacher over the tokenised splits, write top-k or sampled shards."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from kd.cache.store import (MANIFEST, CacheError, _diff, _settings, _teacher_files_sha256, _write_json, _write_shard,
                            read_manifest, shard_name)
from kd.forward import fp32_logits, head, teacher_forward
from kd.integrity import digests, problems
from kd.loss.sampled import teacher_sample, unservable
from kd.loss.topk import teacher_topk

# rows of teacher logits materialised at once while building (bounds the [rows, V] fp32 buffer)
_BUILD_ROWS = 2048


def example_generator(seed: int, example_id: int, device) -> torch.Generator:
    """The draws of one example depend on (seed, example id) only: not on the rank, the shard, the
    batch it was built in, or whether the build was resumed."""
    return torch.Generator(device=device).manual_seed(seed * 2**32 + example_id)


def _sampled_rows(logits: torch.Tensor, example_id: int, settings: dict, temps: list[float], vocab: int,
                  ids_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One example's response rows, packed ragged: the unique ids of every row one after another."""
    s = teacher_sample(logits, settings["draws"], vocab, temps, proposal=settings["proposal_temperature"],
                       generator=example_generator(settings["sample_seed"], example_id, logits.device))
    keep = s.freq > 0
    counts = torch.round(s.freq * settings["draws"])[keep]
    small = torch.uint8 if settings["draws"] <= 255 else torch.int16
    return {"ids": s.ids[keep].to(ids_dtype).cpu(), "counts": counts.to(small).cpu(),
            "logq": s.logq[keep].to(torch.float16).cpu(), "n_unique": keep.sum(-1).to(small).cpu(),
            "log_norm": s.log_norm[:, 1:].cpu()}  # the proposal's column is 0: not stored


@torch.no_grad()
def _shard_tensors(teacher, examples: list[dict], pad_id: int, settings: dict, temps: list[float], vocab: int,
                   batch_size: int, ids_dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    from kd.data import collate

    t_head = head(teacher)
    parts: dict[str, list[torch.Tensor]] = {}
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        batch = collate(chunk, pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        hidden = teacher_forward(teacher, batch)
        if settings["cache_format"] == "sampled":  # one example at a time: its own seeded draws
            start = 0
            for e in chunk:
                rows = _sampled_rows(fp32_logits(hidden[start:start + e["n_response"]], t_head), e["example_id"],
                                     settings, temps, vocab, ids_dtype)
                start += e["n_response"]
                for key, v in rows.items():
                    parts.setdefault(key, []).append(v)
            continue
        for r in range(0, hidden.shape[0], _BUILD_ROWS):
            top = teacher_topk(fp32_logits(hidden[r:r + _BUILD_ROWS], t_head), settings["k"], vocab, temps)
            for key, v in (("ids", top.ids.to(ids_dtype)), ("logits", top.logits), ("tail_lse", top.tail_lse)):
                parts.setdefault(key, []).append(v.cpu())
    n = torch.tensor([e["n_response"] for e in examples], dtype=torch.long)
    return {**{key: torch.cat(v) for key, v in parts.items()},
            "example_ids": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
            "offsets": torch.cat([n.new_zeros(1), n.cumsum(0)])}


def build_cache(cfg, *, k: int = 64, tail_temperatures=None, shard_examples: int = 256,
                batch_size: int | None = None, device_map: str | None = None, log=print,
                cache_format: str = "topk", draws: int = 32, proposal_temperature: float = 1.0,
                sample_seed: int = 0) -> dict:
    """Run the teacher over the teacher views of the train (and eval) split and write the cache
    to cfg.teacher.cache. Collective under `accelerate launch`: shard i goes to rank i % world.
    Finished shards are skipped (the teacher is not even loaded if none is left). -> manifest.
    cache_format "topk" keeps the k largest logits; "sampled" keeps `draws` draws from the teacher
    at `proposal_temperature` (kd.loss.sampled), seeded by (sample_seed, example id).
    `tail_temperatures`: those served exactly; default 1, 2, 4, 8 (topk), or the proposal's and 1 if
    lower (sampled, which serves none above its proposal's)."""
    if tail_temperatures is None:
        tail_temperatures = (1.0, 2.0, 4.0, 8.0) if cache_format == "topk" else \
            (1.0,) if proposal_temperature >= 1.0 else ()
    from accelerate import PartialState

    from kd.data import build_datasets
    from kd.models import check_vocab, load_model, load_tokenizers, resolve, resolve_dtype

    if not cfg.teacher.cache:
        raise CacheError("set teacher.cache=<directory> (or --out) to say where the cache goes")
    out = Path(cfg.teacher.cache)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu, **({"backend": "gloo"} if multi and cpu else {}))  # gloo: CPU ranks form one group
    rank, world = state.process_index, state.num_processes
    say = log if state.is_main_process else (lambda *a: None)

    tok = load_tokenizers(cfg)  # the student's (data) tokenizer, checked against the teacher's
    vocab = len(tok)
    if cache_format not in ("topk", "sampled"):
        raise CacheError(f"--format must be topk or sampled, got {cache_format!r}")
    if cache_format == "topk" and not 1 <= k <= vocab:
        raise CacheError(f"--k must be in [1, {vocab}] (the vocabulary size), got {k}")
    if cache_format == "sampled" and not (1 <= draws <= 32767 and proposal_temperature > 0):
        raise CacheError(f"--draws must be in [1, 32767] and --proposal-temperature > 0, got {draws}, "
                         f"{proposal_temperature}")
    if shard_examples < 1:
        raise CacheError("--shard-examples must be >= 1")
    temps = sorted({1.0, *(float(t) for t in tail_temperatures)})
    if cache_format == "sampled":  # the temperatures served: the proposal's first, then the stored c_T
        temps = sorted({*(float(t) for t in tail_temperatures), float(proposal_temperature)})
        high = unservable(temps, proposal_temperature)
        if high:
            raise CacheError(f"a sampled cache drawn at --proposal-temperature {proposal_temperature:g} cannot serve "
                             f"T = {', '.join(f'{t:g}' for t in high)} (importance weights above the proposal's "
                             f"temperature have a variance that grows with the vocabulary, kd/loss/sampled.py); raise "
                             f"--proposal-temperature to the highest T you will train at")
        temps = [float(proposal_temperature)] + [t for t in temps if t != float(proposal_temperature)]
    if temps[0] <= 0:
        raise CacheError(f"--tail-temperatures must be > 0, got {tail_temperatures}")
    train_set, eval_set, train_stats, eval_stats = build_datasets(cfg.data, tok, cfg.train.seed)
    say(train_stats.summary("train data"))
    splits = {"train": train_set}
    if eval_set is not None:
        say(eval_stats.summary("eval data"))
        splits["eval"] = eval_set
    teacher_path = resolve(cfg.teacher.name_or_path)
    sampling = ({"draws": draws, "proposal_temperature": float(proposal_temperature), "sample_seed": sample_seed}
                if cache_format == "sampled" else {"k": k})
    settings = _settings(cfg, tok, splits, cache_format, sampling, temps, shard_examples,
                         _teacher_files_sha256(teacher_path))

    old = read_manifest(out)
    if old is not None:
        old_settings = {key: v for key, v in old.items() if key not in ("complete", "created", "build", "files")}
        old_settings.setdefault("cache_format", "topk")  # manifests from before the sampled format
        diff = _diff(old_settings, settings)
        if diff:
            raise CacheError(f"{out} already holds a cache built with other settings ({'; '.join(diff[:4])}); "
                             f"use another directory or delete it")
    state.wait_for_everyone()
    if state.is_main_process:
        if old is None:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / MANIFEST, {**settings, "complete": False, "created": _now()})
        for tmp in out.glob(".*.safetensors.*.tmp"):  # left by a killed build; never read, so just drop them
            tmp.unlink(missing_ok=True)
        recorded = (old or {}).get("files") or {}
        damaged = {n: problems(out, recorded, [n]) for n in sorted(recorded)}
        damaged = {n: bad[0] for n, bad in damaged.items() if bad}
        for name, why in damaged.items():  # rebuilt, like a shard never written
            say(f"cache {out}: {why}; rebuilding that shard")
            (out / name).unlink(missing_ok=True)
        if damaged:
            _write_json(out / MANIFEST, {**old, "complete": False,
                                         "files": {n: f for n, f in recorded.items() if n not in damaged}})
    state.wait_for_everyone()

    shards = [(name, i) for name in splits for i in range(settings["splits"][name]["shards"])]
    todo = [(name, i) for j, (name, i) in enumerate(shards)
            if j % world == rank and not (out / shard_name(name, i)).exists()]
    total = len(shards)
    done_before = sum(1 for name, i in shards if (out / shard_name(name, i)).exists())
    what = f"k={k}" if cache_format == "topk" else f"{draws} draws at T={proposal_temperature:g}"
    say(f"cache {out}: {total} shards, {done_before} already written, {what}")
    if todo:
        dtype = resolve_dtype(cfg.teacher.dtype, state.device.type)
        if device_map:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype, device_map=device_map)
        else:
            teacher = load_model(cfg.teacher.name_or_path, dtype, cfg.teacher.attn_implementation, "teacher")
            teacher.to(state.device)
        check_vocab(teacher, vocab, "teacher")
        teacher.eval().requires_grad_(False)
        device = teacher.device if device_map else state.device
        ids_dtype = getattr(torch, settings["ids_dtype"])
        bs = batch_size or cfg.train.micro_batch_size
        for name, i in todo:
            t0 = time.perf_counter()
            ds = splits[name]
            rows = ds.select(range(i * shard_examples, min(len(ds), (i + 1) * shard_examples)))
            tensors = _shard_tensors(teacher, list(rows), tok.pad_token_id, settings, temps, vocab, bs, ids_dtype,
                                     device)
            _write_shard(out / shard_name(name, i), tensors, {"split": name, "shard": str(i), "format": cache_format})
            dt = time.perf_counter() - t0
            log(f"[rank {rank}] {shard_name(name, i)}: {len(rows)} examples, {tensors['ids'].shape[0]} tokens "
                f"in {dt:.1f}s")
    state.wait_for_everyone()
    manifest = read_manifest(out)
    if state.is_main_process:
        missing = [shard_name(n, i) for n in splits for i in range(settings["splits"][n]["shards"])
                   if not (out / shard_name(n, i)).exists()]
        if missing:
            raise CacheError(f"{len(missing)} shards missing after the build (first: {missing[0]}); rerun to finish")
        # checksums of every shard: those verified at the start are kept, the ones written since are hashed
        recorded = manifest.get("files") or {}
        names = [shard_name(n, i) for n in splits for i in range(settings["splits"][n]["shards"])]
        files = {**recorded, **digests(out, [n for n in names if n not in recorded])}
        manifest = {**manifest, "complete": True, "files": {n: files[n] for n in names},
                    "build": {"world_size": world, "finished": _now()}}
        _write_json(out / MANIFEST, manifest)
        nbytes = sum((out / shard_name(n, i)).stat().st_size for n in splits
                     for i in range(settings["splits"][n]["shards"]))
        tokens = sum(s["tokens"] for s in settings["splits"].values())
        say(f"cache {out} complete: {tokens} response tokens, {nbytes / 2**20:.1f} MiB, "
            f"{nbytes / max(tokens, 1):.1f} bytes/token")
    state.wait_for_everyone()
    return read_manifest(out)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

