"""Offline teacher-logit cache: run the teacher once, distil from its stored top-k many times.

Build it (every rank writes its own shards; a rerun skips the shards already written):

    python -m kd.cache --config configs/demo.yaml teacher.cache=runs/cache/demo --k 64
    accelerate launch -m kd.cache --config configs/<name>.yaml teacher.cache=<dir> --k 64

then train with the same config and `teacher.cache=<dir>`: no teacher is loaded, the divergence
is computed from the cache (`topk_kd_loss`), and eval uses the cached eval split.

Directory layout
----------------
    manifest.json               teacher identity, tokenizer hash, k, data settings and length
                                limits, erasure settings, per-split fingerprints; "complete": true
                                once every shard exists (an incomplete cache is refused)
    train-00000.safetensors     shard i holds examples [i*S, (i+1)*S) of the tokenised split
    eval-00000.safetensors

Per response token a shard stores the teacher's (fp32, vocabulary cut to the tokenizer's)
    ids       [k]  top-k token ids, sorted by logit (int16 when V <= 32768, else int32)
    logits    [k]  their raw logits (T = 1)
    tail_lse  [m]  log sum_{j not in top-k} exp(z_j / T) for each of the m `tail_temperatures`
                   (--tail-temperatures, default 1,2,4,8): the exact mass of the other V - k
                   tokens at those temperatures
plus per example `example_ids` and row `offsets`. Bytes per token: k * (2 or 4) + 4k + 4m.
Shards are written to a hidden temporary name and renamed into place (atomic), so a killed build
never leaves a half-written shard under a name that is read.

Loss on cached logits, and how the tail is handled
--------------------------------------------------
Both distributions are collapsed to k + 1 buckets: the teacher's top-k tokens, and one bucket for
everything else. The student's buckets are exact (its full logits are there): its top-k entries
and its tail mass logsumexp_{j not in top-k}(s_j / T) - logsumexp(s / T). The teacher's top-k
entries at temperature T are z_i / T, re-normalised against

    log Z_T = logaddexp(logsumexp(z_topk / T), tail_T),   tail_T = log sum_tail exp(z_j / T).

tail_T is stored for the tail temperatures, so at those T the teacher's buckets are exact. The
tempered tail mass depends on the tail's shape, which is not stored, so another T is estimated:
between two stored temperatures by the chord of tail_T in 1/T (log-sum-exp is convex in 1/T, so
the chord is an upper bound, and tight when the stored temperatures are close); outside them by
taking the tail at the nearest stored temperature T0 as flat over its V - k tokens:

    tail_T ~= (T0/T) * tail_T0 + (1 - T0/T) * log(V - k)

(exact for a flat tail; for T > T0 an upper bound by the power-mean inequality). With only T0 = 1
stored this flat estimate is poor for peaked, LLM-like tails (measured in benchmarks/README.md),
which is why several temperatures are stored: they cost 4 bytes per token each.

Separately, the divergence is taken between the bucketed distributions. For KL,
KL(p || q) = KL_buckets + p_tail * KL(p(.|tail) || q(.|tail)); the second term (the teacher's
shape inside its tail) is unknown and dropped, so at a stored temperature the cached divergence is
at most the live one (data-processing inequality, which holds for every divergence here), and the
student's within-tail shape gets no gradient, only its total tail mass. With k = V there is no
tail and the loss equals the live one. The dropped term is the main error at T > 1: tempering
moves a large share of an LLM-like teacher's mass into the tail (e.g. ~45% beyond the top 64 at
T = 2 in the synthetic benchmark), so choose k with the temperatures to be swept in mind.
Measured errors, bytes and speed: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.checkpoint import fsync_dir
from kd.distributed import gathered
from kd.errors import KDError, one_line_errors
from kd.forward import Distiller, fp32_logits, head, response_hidden, teacher_forward
from kd.losses import LossParts, divergence_from_logprobs, mix

FORMAT, VERSION = "kd-teacher-cache", 1
MANIFEST = "manifest.json"
# rows of teacher logits materialised at once while building (bounds the [rows, V] fp32 buffer)
_BUILD_ROWS = 2048


class CacheError(KDError):
    """A cache that is missing, incomplete, or does not match the run."""


class CachedTopK(NamedTuple):
    """Cached teacher outputs for N response rows (a NamedTuple so DDP moves it like a tensor)."""

    ids: torch.Tensor  # [N, k] long, sorted by teacher logit, descending
    logits: torch.Tensor  # [N, k] fp32 teacher logits at T = 1
    tail_lse: torch.Tensor  # [N, m] fp32 log sum exp(z / T) of the other V - k logits (-inf if k = V)
    tail_temperatures: torch.Tensor  # [m] the T of each tail_lse column (1 first)


# --------------------------------------------------------------------------- loss math


def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int, tail_temperatures=(1.0,)) -> CachedTopK:
    """What the cache stores for full teacher logits [N, Vt] (Vt >= vocab_size), fp32."""
    z = logits[..., :vocab_size].float()
    top = z.topk(k, dim=-1, sorted=True)
    temps = torch.tensor([float(t) for t in tail_temperatures])
    if k < vocab_size:
        rest = z.scatter(-1, top.indices, float("-inf"))
        tail = torch.stack([(rest / t).logsumexp(-1) for t in temps.tolist()], -1)
    else:
        tail = z.new_full((*z.shape[:-1], len(temps)), float("-inf"))
    return CachedTopK(top.indices, top.values, tail, temps.to(z.device))


def tempered_tail_lse(tail_lse: torch.Tensor, tail_temperatures, n_tail: int, temperature: float) -> torch.Tensor:
    """log sum_tail exp(z_j / T) [N] from its stored values [N, m] (or [N] at T = 1) at
    `tail_temperatures`: exact at a stored T, else the module doc's chord or flat-tail estimate."""
    if torch.is_tensor(tail_temperatures):
        tail_temperatures = tail_temperatures.tolist()
    temps = [float(t) for t in tail_temperatures]
    lse = (tail_lse if tail_lse.dim() == 2 else tail_lse.unsqueeze(-1)).float()
    if temperature in temps:
        return lse[:, temps.index(temperature)]
    lse = lse.clamp_min(-1e30)  # a fully masked tail (-inf) must not give inf - inf below
    betas, b = [1.0 / t for t in temps], 1.0 / temperature
    lo = [i for i, x in enumerate(betas) if x < b]
    hi = [i for i, x in enumerate(betas) if x > b]
    if lo and hi:
        i, j = max(lo, key=betas.__getitem__), min(hi, key=betas.__getitem__)
        w = (b - betas[i]) / (betas[j] - betas[i])
        return lse[:, i] + w * (lse[:, j] - lse[:, i])
    i = min(range(len(betas)), key=lambda n: abs(betas[n] - b))
    r = b / betas[i]
    return r * lse[:, i] + (1.0 - r) * math.log(n_tail)


def bucket_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_tail_lse: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float,
    tail_temperatures=(1.0,),
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (teacher, student) tempered log-probabilities over k + 1 buckets [N, k+1] (just [N, k]
    when k = vocab_size): the teacher's top-k tokens, then the tail bucket."""
    s = student_logits[..., :vocab_size].float() / temperature
    s_lse = s.logsumexp(-1, keepdim=True)
    ids = topk_ids.long()
    s_top = s.gather(-1, ids) - s_lse
    t_top = topk_logits.float() / temperature
    n_tail = vocab_size - ids.shape[-1]
    if n_tail == 0:
        return t_top - t_top.logsumexp(-1, keepdim=True), s_top
    # the student's tail from its own logits (exact, no 1 - sum cancellation)
    s_tail = s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - s_lse
    t_tail = tempered_tail_lse(teacher_tail_lse, tail_temperatures, n_tail, temperature).unsqueeze(-1)
    t_all = torch.cat([t_top, t_tail], -1)
    return t_all - t_all.logsumexp(-1, keepdim=True), torch.cat([s_top, s_tail], -1)


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_tail_lse: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    alpha: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    tail_temperatures=(1.0,),
) -> LossParts:
    """`kd.losses.kd_loss` with the teacher given by its cached top-k (module doc): token sums,
    fp32. student_logits [N, Vs >= vocab_size], topk_ids/topk_logits [N, k], teacher_tail_lse
    [N, m] (log sum exp(z / T) of the other V - k teacher logits at each of the m
    `tail_temperatures`; or [N] at T = 1), labels [N]. Every divergence of kd.losses is
    supported, on the k + 1 buckets; with k = vocab_size it equals kd_loss."""
    s = student_logits[..., :vocab_size].float()
    ce = F.cross_entropy(s, labels, reduction="none").sum()
    if alpha < 1.0:
        t_logp, s_logp = bucket_logprobs(s, topk_ids, topk_logits, teacher_tail_lse, vocab_size=vocab_size,
                                         temperature=temperature, tail_temperatures=tail_temperatures)
        kd = divergence_from_logprobs(t_logp, s_logp, divergence, beta=beta, skew=skew).sum()
    else:
        kd = ce.new_zeros(())
    return LossParts(mix(ce, kd, alpha, temperature), ce.detach(), kd.detach(), labels.numel())


class CachedDistiller(Distiller):
    """The Distiller with the teacher replaced by cached top-k rows: forward(batch, CachedTopK or
    None, ignored) -> the same token sums. loss.implementation=chunked projects and scores
    `loss.chunk_size` student rows at a time under activation checkpointing, so backward holds
    one chunk's [rows, V] at a time (the analytic kernels of kd.chunked need the teacher's rows)."""

    def forward(self, batch: dict, cached: CachedTopK | None, teacher_head=None):
        c = self.loss_cfg
        h = response_hidden(self.student, batch["student_input_ids"], batch["student_attention_mask"],
                            batch["student_index"])
        s_head = head(self.student)
        kw = dict(vocab_size=self.vocab_size, alpha=c.alpha if cached is not None else 1.0,
                  temperature=c.temperature, divergence=c.divergence, beta=c.beta, skew=c.skew)
        labels = batch["labels"]
        if cached is None:  # CE only (alpha = 1): empty teacher rows keep one code path
            n = labels.shape[0]
            cached = CachedTopK(labels.new_zeros(n, 0), h.new_zeros(n, 0), h.new_zeros(n, 1), h.new_ones(1))
        kw["tail_temperatures"] = cached.tail_temperatures.tolist()
        rows = (h, cached.ids, cached.logits, cached.tail_lse, labels)

        def sums(h_c, ids_c, logits_c, tail_c, labels_c):
            p = topk_kd_loss(fp32_logits(h_c, s_head), ids_c, logits_c, tail_c, labels_c, **kw)
            return p.weighted_sum, p.ce_sum, p.kd_sum

        if c.implementation == "chunked" and h.shape[0] > c.chunk_size:
            from torch.utils.checkpoint import checkpoint

            out = [checkpoint(sums, *(t[i:i + c.chunk_size] for t in rows), use_reentrant=False)
                   for i in range(0, h.shape[0], c.chunk_size)]
            weighted, ce, kd = (torch.stack(list(x)).sum() for x in zip(*out))
        else:
            weighted, ce, kd = sums(*rows)
        return dict(weighted_sum=weighted, ce_sum=ce, kd_sum=kd)


@torch.no_grad()
def cached_eval_sums(student, cache: "TeacherCache", batch: dict, loss, vocab_size: int) -> dict[str, torch.Tensor]:
    """`kd.forward.eval_sums` against the cached eval split: CE (exact), the bucketed divergence,
    the configured total, and top-1 agreement (exact: the cached ids are sorted)."""
    hs = response_hidden(student, batch["student_input_ids"], batch["student_attention_mask"], batch["student_index"])
    with gathered(head(student).weight):  # ZeRO-3: the head is used outside its module's forward
        s_logits = fp32_logits(hs, head(student))[:, :vocab_size]
    rows = cache.lookup(batch, "eval")
    ce = F.cross_entropy(s_logits, batch["labels"], reduction="none").sum()
    t_logp, s_logp = bucket_logprobs(s_logits, rows.ids, rows.logits, rows.tail_lse, vocab_size=vocab_size,
                                     temperature=loss.temperature, tail_temperatures=rows.tail_temperatures)
    kd = divergence_from_logprobs(t_logp, s_logp, loss.divergence, beta=loss.beta, skew=loss.skew).sum()
    agree = (s_logits.argmax(-1) == rows.ids[:, 0]).sum().float() if rows.ids.shape[0] else ce.new_zeros(())
    tokens = torch.tensor(float(batch["labels"].numel()), device=hs.device)
    return dict(ce=ce, kd=kd, loss=mix(ce, kd, loss.alpha, loss.temperature), top1_agreement=agree, tokens=tokens)


# --------------------------------------------------------------------------- identities


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with equal hashes map ids alike."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def dataset_fingerprint(ds) -> dict:
    """Examples, response tokens and a hash of what the cache is keyed on: each example's id, its
    teacher view and response length. Any change of data, template, tokenizer, length policy or
    seed that changes what the teacher would see changes the hash."""
    import numpy as np

    h = hashlib.sha256()
    tokens = 0
    cols = ["example_id", "teacher_start", "n_response"]
    # fixed batch size: the hash covers each batch's columns in turn, so it must not vary
    for tbl in ds.select_columns([*cols, "teacher_ids"]).with_format("arrow").iter(batch_size=4096):
        for name in cols:
            h.update(np.asarray(tbl.column(name).to_numpy(), dtype=np.int64).tobytes())
        ids = tbl.column("teacher_ids").combine_chunks()
        h.update(np.asarray(ids.value_lengths().to_numpy(), dtype=np.int64).tobytes())
        h.update(np.asarray(ids.flatten().to_numpy(), dtype=np.int64).tobytes())
        tokens += int(np.asarray(tbl.column("n_response").to_numpy()).sum())
    return {"examples": len(ds), "tokens": tokens, "sha256": h.hexdigest()}


def _teacher_files_sha256(path: str) -> str | None:
    """config.json plus weight file names and sizes of a local model directory (cheap: the
    weights themselves are not read), or None for a hub id."""
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    if (p / "config.json").is_file():
        h.update((p / "config.json").read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _settings(cfg, tokenizer, splits: dict, k: int, tail_temperatures: list[float], shard_examples: int,
              teacher_sha: str | None) -> dict:
    d = cfg.data
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"name_or_path": cfg.teacher.name_or_path, "dtype": cfg.teacher.dtype, "files_sha256": teacher_sha},
        "tokenizer": {"name_or_path": cfg.student.name_or_path, "sha256": tokenizer_sha256(tokenizer),
                      "vocab_size": len(tokenizer)},
        "k": k,
        "tail_temperatures": tail_temperatures,
        "ids_dtype": "int16" if len(tokenizer) <= 2**15 else "int32",
        "shard_examples": shard_examples,
        "data": {"train_files": list(d.train_files), "eval_files": list(d.eval_files), "dataset": d.dataset,
                 "dataset_config": d.dataset_config, "train_split": d.train_split, "eval_split": d.eval_split,
                 "eval_fraction": d.eval_fraction, "chat_template": d.chat_template, "seed": cfg.train.seed},
        "length": {"max_length": d.max_length, "min_prompt_tokens": d.min_prompt_tokens},
        "erasure": {"erase_strategy": d.erase_strategy, "generic_system": d.generic_system},
        "splits": {name: {**dataset_fingerprint(ds), "shards": -(-len(ds) // shard_examples)}
                   for name, ds in splits.items()},
    }


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


# --------------------------------------------------------------------------- files


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.safetensors"


def _replace_atomic(tmp: Path, final: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a shared cache must be readable
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _replace_atomic(tmp, path)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _replace_atomic(tmp, path)


def read_manifest(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CacheError(f"{Path(path) / MANIFEST}: unreadable manifest ({e})") from None


# --------------------------------------------------------------------------- building


@torch.no_grad()
def _shard_tensors(teacher, examples: list[dict], pad_id: int, k: int, temps: list[float], vocab: int,
                   batch_size: int, ids_dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    from kd.data import collate

    t_head = head(teacher)
    ids, logits, tails = [], [], []
    for b in range(0, len(examples), batch_size):
        batch = collate(examples[b:b + batch_size], pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        hidden = teacher_forward(teacher, batch)
        for r in range(0, hidden.shape[0], _BUILD_ROWS):
            top = teacher_topk(fp32_logits(hidden[r:r + _BUILD_ROWS], t_head), k, vocab, temps)
            ids.append(top.ids.to(ids_dtype).cpu())
            logits.append(top.logits.cpu())
            tails.append(top.tail_lse.cpu())
    n = torch.tensor([e["n_response"] for e in examples], dtype=torch.long)
    return {"ids": torch.cat(ids), "logits": torch.cat(logits), "tail_lse": torch.cat(tails),
            "example_ids": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
            "offsets": torch.cat([n.new_zeros(1), n.cumsum(0)])}


def build_cache(cfg, *, k: int, tail_temperatures=(1.0, 2.0, 4.0, 8.0), shard_examples: int = 256,
                batch_size: int | None = None, device_map: str | None = None, log=print) -> dict:
    """Run the teacher over the teacher views of the train (and eval) split and write the cache
    to cfg.teacher.cache. Collective under `accelerate launch`: shard i goes to rank i % world.
    Finished shards are skipped (the teacher is not even loaded if none is left). -> manifest."""
    from accelerate import PartialState

    from kd.data import build_datasets
    from kd.models import check_same_tokenizer, check_vocab, load_model, load_tokenizer, resolve_dtype
    from kd import demo

    if not cfg.teacher.cache:
        raise CacheError("set teacher.cache=<directory> (or --out) to say where the cache goes")
    out = Path(cfg.teacher.cache)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu, **({"backend": "gloo"} if multi and cpu else {}))  # gloo: CPU ranks form one group
    rank, world = state.process_index, state.num_processes
    say = log if state.is_main_process else (lambda *a: None)

    tok = load_tokenizer(cfg.student.name_or_path, cfg.data.chat_template)
    check_same_tokenizer(tok, load_tokenizer(cfg.teacher.name_or_path, cfg.data.chat_template),
                         cfg.student.name_or_path, cfg.teacher.name_or_path)
    vocab = len(tok)
    if not 1 <= k <= vocab:
        raise CacheError(f"--k must be in [1, {vocab}] (the vocabulary size), got {k}")
    if shard_examples < 1:
        raise CacheError("--shard-examples must be >= 1")
    temps = sorted({1.0, *(float(t) for t in tail_temperatures)})
    if temps[0] <= 0:
        raise CacheError(f"--tail-temperatures must be > 0, got {tail_temperatures}")
    train_set, eval_set, train_stats, eval_stats = build_datasets(cfg.data, tok, cfg.train.seed)
    say(train_stats.summary("train data"))
    splits = {"train": train_set}
    if eval_set is not None:
        say(eval_stats.summary("eval data"))
        splits["eval"] = eval_set
    teacher_path = demo.resolve(cfg.teacher.name_or_path)
    settings = _settings(cfg, tok, splits, k, temps, shard_examples, _teacher_files_sha256(teacher_path))

    old = read_manifest(out)
    if old is not None:
        old_settings = {key: v for key, v in old.items() if key not in ("complete", "created", "build")}
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
    state.wait_for_everyone()

    shards = [(name, i) for name in splits for i in range(settings["splits"][name]["shards"])]
    todo = [(name, i) for j, (name, i) in enumerate(shards)
            if j % world == rank and not (out / shard_name(name, i)).exists()]
    total = len(shards)
    done_before = sum(1 for name, i in shards if (out / shard_name(name, i)).exists())
    say(f"cache {out}: {total} shards, {done_before} already written, k={k}")
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
            tensors = _shard_tensors(teacher, list(rows), tok.pad_token_id, k, temps, vocab, bs, ids_dtype, device)
            _write_shard(out / shard_name(name, i), tensors, {"split": name, "shard": str(i), "k": str(k)})
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
        manifest = {**manifest, "complete": True, "build": {"world_size": world, "finished": _now()}}
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


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """A validated, complete cache. `lookup(batch, split)` -> CachedTopK for the batch's rows."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.k = manifest["k"]
        self.tail_temperatures = torch.tensor(manifest["tail_temperatures"], dtype=torch.float32)
        self._files: dict[tuple[str, int], object] = {}
        self._index: dict[str, dict[int, tuple[int, int, int]]] = {}
        from safetensors import safe_open

        for split, info in manifest["splits"].items():
            index = self._index[split] = {}
            for i in range(info["shards"]):
                f = self._file(split, i, safe_open)
                eids, offs = f.get_tensor("example_ids").tolist(), f.get_tensor("offsets").tolist()
                for j, eid in enumerate(eids):
                    index[eid] = (i, offs[j], offs[j + 1] - offs[j])

    def _file(self, split: str, i: int, opener=None):
        key = (split, i)
        if key not in self._files:
            if opener is None:
                from safetensors import safe_open as opener
            path = self.path / shard_name(split, i)
            try:
                f = opener(str(path), framework="pt")
            except Exception as e:  # missing or truncated file
                raise CacheError(f"cannot read cache shard {path}: {str(e).splitlines()[0][:200]}") from None
            self._files[key] = (f, f.get_slice("ids"), f.get_slice("logits"), f.get_slice("tail_lse"))
        return self._files[key][0]

    @classmethod
    def open(cls, cfg, tokenizer, train_set, eval_set=None) -> "TeacherCache":
        """Open cfg.teacher.cache and check that it was built for this run: same teacher, tokenizer,
        length limits and data (per-split fingerprints of the teacher views). A mismatch raises
        CacheError with one line saying what differs."""
        path = Path(cfg.teacher.cache)
        m = read_manifest(path)
        if m is None:
            raise CacheError(f"teacher.cache={path}: no {MANIFEST} there; build it with "
                             f"`python -m kd.cache --config <config> teacher.cache={path}`")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheError(f"{path}: not a version-{VERSION} {FORMAT} (format {m.get('format')!r}, "
                             f"version {m.get('version')!r})")
        if not m.get("complete"):
            raise CacheError(f"{path}: the cache is incomplete (its build was interrupted); rerun the same "
                             f"kd.cache command to finish it")
        where = f"cache {path}"
        if m["tokenizer"]["sha256"] != tokenizer_sha256(tokenizer):
            raise CacheError(f"{where} was built with a different tokenizer ({m['tokenizer']['name_or_path']!r}, "
                             f"{m['tokenizer']['vocab_size']} tokens) than this run's "
                             f"({cfg.student.name_or_path!r}, {len(tokenizer)} tokens)")
        if m["teacher"]["name_or_path"] != cfg.teacher.name_or_path:
            raise CacheError(f"{where} holds the logits of teacher {m['teacher']['name_or_path']!r}, but "
                             f"teacher.name_or_path is {cfg.teacher.name_or_path!r}")
        for key, built in m["length"].items():
            now = getattr(cfg.data, key)
            if built != now:
                raise CacheError(f"{where} was built with data.{key}={built}, this run has data.{key}={now}; "
                                 f"rebuild the cache or set data.{key}={built}")
        run_splits = {"train": train_set, **({"eval": eval_set} if eval_set is not None else {})}
        for split, ds in run_splits.items():
            if split not in m["splits"]:
                raise CacheError(f"{where} has no {split} split (built without eval data); rebuild it with "
                                 f"this run's data settings")
            fp, built = dataset_fingerprint(ds), m["splits"][split]
            if fp["sha256"] != built["sha256"]:
                src = m["data"]["train_files"] or m["data"]["dataset"]
                raise CacheError(
                    f"{where} was built from different data: {split} split fingerprint differs (cache: {src}, "
                    f"seed {m['data']['seed']}, {built['examples']} examples, {built['tokens']} response tokens; "
                    f"this run: {fp['examples']} examples, {fp['tokens']} response tokens); rebuild the cache "
                    f"with this run's data settings")
        return cls(path, m)

    def lookup(self, batch: dict, split: str) -> CachedTopK:
        """Cached rows for the batch's label rows, in order, on the batch's device."""
        dev = batch["labels"].device
        index = self._index.get(split)
        if index is None:
            raise CacheError(f"cache {self.path} has no {split} split")
        ids, logits, tails = [], [], []
        for eid, n in zip(batch["example_ids"].tolist(), batch["n_response"].tolist()):
            hit = index.get(eid)
            if hit is None or hit[2] != n:
                raise CacheError(f"cache {self.path}: {split} example {eid} is "
                                 f"{'missing' if hit is None else f'cached with {hit[2]} response tokens, not {n}'}")
            i, start, _ = hit
            self._file(split, i)
            _, s_ids, s_logits, s_tail = self._files[(split, i)]
            ids.append(s_ids[start:start + n])
            logits.append(s_logits[start:start + n])
            tails.append(s_tail[start:start + n])
        temps = self.tail_temperatures.to(dev)
        if not ids:
            return CachedTopK(torch.zeros(0, self.k, dtype=torch.long, device=dev), torch.zeros(0, self.k, device=dev),
                              torch.zeros(0, len(temps), device=dev), temps)
        return CachedTopK(torch.cat(ids).to(dev).long(), torch.cat(logits).to(dev), torch.cat(tails).to(dev), temps)

    def describe(self) -> str:
        m = self.manifest
        tokens = sum(s["tokens"] for s in m["splits"].values())
        splits = ", ".join(f"{n} {s['examples']} examples" for n, s in m["splits"].items())
        return (f"teacher: cached top-{self.k} logits of {m['teacher']['name_or_path']!r} from {self.path} "
                f"({splits}, {tokens} response tokens); no teacher loaded")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """python -m kd.cache --config <yaml> teacher.cache=<dir> [--k 64] [overrides]"""
    ap = argparse.ArgumentParser(prog="kd.cache", allow_abbrev=False,
                                 description="Run the teacher once and store its top-k logits (see kd/cache.py).")
    ap.add_argument("--k", type=int, default=64, help="top-k logits kept per response token (default 64)")
    ap.add_argument("--tail-temperatures", default="1,2,4,8",
                    help="temperatures whose exact tail mass is stored (1 is always included; default 1,2,4,8)")
    ap.add_argument("--shard-examples", type=int, default=256, help="examples per shard file (default 256)")
    ap.add_argument("--batch-size", type=int, default=None, help="teacher micro-batch (default train.micro_batch_size)")
    ap.add_argument("--device-map", default=None,
                    help="from_pretrained device_map, e.g. auto: one process spreads the teacher over its GPUs")
    ap.add_argument("--out", default=None, help="cache directory (default: teacher.cache)")
    args, rest = ap.parse_known_args(argv)
    with one_line_errors():
        from kd.config import load_config
        from kd.train import parse_args, quiet_libraries

        path, overrides = parse_args(rest)
        if args.out:
            overrides = [*overrides, f"teacher.cache={args.out}"]
        quiet_libraries()
        try:
            temps = [float(t) for t in args.tail_temperatures.split(",") if t.strip()]
        except ValueError:
            raise CacheError(f"--tail-temperatures takes numbers, not {args.tail_temperatures!r}") from None
        build_cache(load_config(path, overrides), k=args.k, tail_temperatures=temps, shard_examples=args.shard_examples,
                    batch_size=args.batch_size, device_map=args.device_map)


if __name__ == "__main__":
    main()
