"""The cache on disk: manifest, identities and fingerprints, shard files, and the reader.

Build it (every rank writes its own shards; a rerun skips the shards already written):

    python -m kd.cache --config configs/demo.yaml teacher.cache=runs/cache/demo --k 64
    accelerate launch -m kd.cache --config configs/<name>.yaml teacher.cache=<dir> --k 64

then train with the same config and `teacher.cache=<dir>`: no teacher is loaded, the divergence
is computed from the cache (`topk_kd_loss`), and eval uses the cached eval split.

Directory layout
----------------
    manifest.json               teacher identity, tokenizer hash, k, data settings and length
                                limits, erasure settings, per-split fingerprints; "complete": true
                                once every shard exists (an incomplete cache is refused), with
                                "files": the size and XXH3-128 hash of every shard (kd.integrity),
                                checked by the ranks together whenever the cache is opened
    train-00000.safetensors     shard i holds examples [i*S, (i+1)*S) of the tokenised split
    eval-00000.safetensors

Two formats ("cache_format" in the manifest; kd.loss.topk and kd.loss.sampled explain the losses).
Per response token a top-k shard (the default, `--format topk`) stores the teacher's (fp32,
vocabulary cut to the tokenizer's)
    ids       [k]  top-k token ids, sorted by logit (int16 when V <= 32768, else int32)
    logits    [k]  their raw logits (T = 1)
    tail_lse  [m]  log sum_{j not in top-k} exp(z_j / T) for each of the m `tail_temperatures`
                   (--tail-temperatures, default 1,2,4,8): the exact mass of the other V - k
                   tokens at those temperatures
Bytes per token: k * (2 or 4) + 4k + 4m. A sampled shard (`--format sampled --draws N`) stores, ragged
(the unique ids of one token after another),
    ids       [U_t]  the unique ids among N draws from the teacher at the proposal temperature T0
    counts    [U_t]  how often each was drawn (uint8 when N <= 255, else int16)
    logq      [U_t]  log q(id), the proposal's log-probability (fp16)
    n_unique  [1]    U_t (uint8 / int16)
    log_norm  [m-1]  c_T of the module doc of kd.loss.sampled for each served T other than T0 (fp32)
Bytes per token: U_t * (2 or 4 + 1 + 2) + 1 + 4(m - 1). Both formats hold per example `example_ids`
and row `offsets`.
Shards are written to a hidden temporary name and renamed into place (atomic), so a killed build
never leaves a half-written shard under a name that is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kd.integrity import fsync_dir, problems, summary
from kd.errors import KDError
from kd.loss.sampled import CachedSample, check_serves
from kd.loss.spec import LossSpec
from kd.loss.topk import CachedTopK
from kd.models import tokenizer_sha256

FORMAT, VERSION = "kd-teacher-cache", 2  # 2: multi-turn targets (spans per example)
MANIFEST = "manifest.json"


class CacheError(KDError):
    """A cache that is missing, incomplete, or does not match the run."""


# --------------------------------------------------------------------------- identities


def dataset_fingerprint(ds) -> dict:
    """Examples, response tokens and a hash of what the cache is keyed on: each example's id, its
    teacher view and response length. Any change of data, template, tokenizer, length policy or
    seed that changes what the teacher would see changes the hash."""
    import numpy as np

    h = hashlib.sha256()
    tokens = 0
    cols = ["example_id", "n_response"]
    # fixed batch size: the hash covers each batch's columns in turn, so it must not vary
    for tbl in ds.select_columns([*cols, "teacher_starts", "target_lens", "teacher_ids"]).with_format("arrow") \
            .iter(batch_size=4096):
        for name in cols:
            h.update(np.asarray(tbl.column(name).to_numpy(), dtype=np.int64).tobytes())
        for name in ("teacher_starts", "target_lens", "teacher_ids"):
            ids = tbl.column(name).combine_chunks()
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


def _settings(cfg, tokenizer, splits: dict, cache_format: str, sampling: dict, tail_temperatures: list[float],
              shard_examples: int, teacher_sha: str | None) -> dict:
    """`sampling`: {"k": k} for a top-k cache, {"draws", "proposal_temperature", "sample_seed"} for a
    sampled one; `tail_temperatures` are the temperatures the cache serves exactly."""
    d = cfg.data
    return {
        "format": FORMAT,
        "version": VERSION,
        "cache_format": cache_format,
        "teacher": {"name_or_path": cfg.teacher.name_or_path, "dtype": cfg.teacher.dtype, "files_sha256": teacher_sha},
        "tokenizer": {"name_or_path": cfg.student.name_or_path, "sha256": tokenizer_sha256(tokenizer),
                      "vocab_size": len(tokenizer)},
        **sampling,
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


def shard_names(manifest: dict) -> list[str]:
    return [shard_name(split, i) for split, info in manifest["splits"].items() for i in range(info["shards"])]


def verify_shards(path: Path, manifest: dict) -> str | None:
    """Collective under a multi-process run (each rank hashes a share). None when every shard
    matches the manifest's checksums, else what is wrong (one line)."""
    from accelerate import PartialState

    record = manifest.get("files")
    if record is None:
        return "the manifest holds no checksums (built by an older kd)"
    state = PartialState()
    names = shard_names(manifest)
    missing = [f"{n} has no checksum" for n in names if n not in record]
    mine = [n for n in names if n in record][state.process_index::state.num_processes]
    found = problems(path, record, mine)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        found = [b for b in gather_object(found)]
    found += missing
    return summary(found) if found else None


def read_manifest(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CacheError(f"{Path(path) / MANIFEST}: unreadable manifest ({e})") from None


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """A validated, complete cache. `lookup(batch, split)` -> CachedTopK (or CachedSample for a
    sampled cache) for the batch's rows."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.sampled = manifest.get("cache_format", "topk") == "sampled"
        self.k = manifest.get("k")
        self.tail_temperatures = torch.tensor(manifest["tail_temperatures"], dtype=torch.float32)
        # the sampled format's ids, counts and logq are ragged (indexed by flat entry), the rest by row
        self._names = ("ids", "counts", "logq", "log_norm", "n_unique") if self.sampled else ("ids", "logits", "tail_lse")
        self._flat = {"ids", "counts", "logq"} if self.sampled else set()
        self._files: dict[tuple[str, int], tuple] = {}
        # example id -> (shard, first row, rows, first flat entry, flat entries); the flat range is the
        # sampled format's ragged ids (for top-k it equals the row range)
        self._index: dict[str, dict[int, tuple[int, int, int, int, int]]] = {}
        from safetensors import safe_open

        for split, info in manifest["splits"].items():
            index = self._index[split] = {}
            for i in range(info["shards"]):
                f = self._file(split, i, safe_open)
                eids, offs = f.get_tensor("example_ids").tolist(), f.get_tensor("offsets").tolist()
                flat = offs
                if self.sampled:
                    n_u = f.get_tensor("n_unique").long()
                    flat = torch.cat([n_u.new_zeros(1), n_u.cumsum(0)])[offs].tolist()
                for j, eid in enumerate(eids):
                    index[eid] = (i, offs[j], offs[j + 1] - offs[j], flat[j], flat[j + 1])

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
            self._files[key] = (f, *(f.get_slice(n) for n in self._names))
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
        damage = verify_shards(path, m)
        if damage:
            raise CacheError(f"{where} is damaged: {damage}; rerun the same kd.cache command to rebuild what is "
                             f"damaged")
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
        if m.get("cache_format") == "sampled":
            why = check_serves(LossSpec.from_config(cfg.loss, len(tokenizer)), m["tail_temperatures"])
            if why:
                raise CacheError(f"{where}: {why}")
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

    def lookup(self, batch: dict, split: str) -> CachedTopK | CachedSample:
        """Cached rows for the batch's label rows, in order, on the batch's device."""
        dev = batch["labels"].device
        index = self._index.get(split)
        if index is None:
            raise CacheError(f"cache {self.path} has no {split} split")
        got: list[list[torch.Tensor]] = [[] for _ in self._names]
        for eid, n in zip(batch["example_ids"].tolist(), batch["n_response"].tolist()):
            hit = index.get(eid)
            if hit is None or hit[2] != n:
                raise CacheError(f"cache {self.path}: {split} example {eid} is "
                                 f"{'missing' if hit is None else f'cached with {hit[2]} response tokens, not {n}'}")
            i, start, _, lo, hi = hit
            self._file(split, i)
            slices = self._files[(split, i)][1:]
            for out, name, sl in zip(got, self._names, slices):
                out.append(sl[lo:hi] if name in self._flat else sl[start:start + n])
        temps = self.tail_temperatures.to(dev)
        if self.sampled:
            return self._padded(got, temps, dev)
        if not got[0]:
            return CachedTopK(torch.zeros(0, self.k, dtype=torch.long, device=dev), torch.zeros(0, self.k, device=dev),
                              torch.zeros(0, len(temps), device=dev), temps)
        ids, logits, tails = (torch.cat(x).to(dev) for x in got)
        return CachedTopK(ids.long(), logits, tails, temps)

    def _padded(self, got, temps, dev) -> CachedSample:
        """The ragged rows of a sampled cache as [rows, U] (U: the most unique ids of a row here)."""
        ids, counts, logq, log_norm, n_u = (torch.cat(x) if x else None for x in got)
        if ids is None:
            z = torch.zeros(0, 0, device=dev)
            return CachedSample(z.long(), z, z, torch.zeros(0, len(temps), device=dev), temps, temps[:1])
        n_u = n_u.long()
        rows = torch.repeat_interleave(torch.arange(n_u.numel()), n_u)
        col = torch.arange(rows.numel()) - (torch.cumsum(n_u, 0) - n_u)[rows]
        shape = (n_u.numel(), int(n_u.max()))
        p_ids = torch.zeros(shape, dtype=torch.long).index_put_((rows, col), ids.long())
        p_freq = torch.zeros(shape).index_put_((rows, col), counts.float() / self.manifest["draws"])
        p_logq = torch.zeros(shape).index_put_((rows, col), logq.float())
        norm = torch.cat([log_norm.new_zeros(n_u.numel(), 1), log_norm.float()], -1)  # the proposal's c_T is 0
        return CachedSample(p_ids.to(dev), p_freq.to(dev), p_logq.to(dev), norm.to(dev), temps, temps[:1])

    def describe(self) -> str:
        m = self.manifest
        tokens = sum(s["tokens"] for s in m["splits"].values())
        splits = ", ".join(f"{n} {s['examples']} examples" for n, s in m["splits"].items())
        what = (f"{m['draws']} samples per token (T={m['proposal_temperature']:g}; serves T = "
                f"{', '.join(f'{t:g}' for t in m['tail_temperatures'])})" if self.sampled else f"top-{self.k} logits")
        return (f"teacher: cached {what} of {m['teacher']['name_or_path']!r} from {self.path} "
                f"({splits}, {tokens} response tokens); no teacher loaded")
