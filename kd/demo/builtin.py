"""Built-in tiny models, so the demo and the tests need no downloads.

`resolve("builtin:<name>")` returns a local directory that `from_pretrained` can load; any other
string is returned unchanged (a hub id or a local path). Names:

  builtin:tokenizer          the shipped project tokenizer (kd/demo/assets/tokenizer), not copied.
  builtin:tiny-teacher       the shipped *trained* demo teacher (kd/demo/assets/teacher, not copied),
                             made by scripts/train_teacher.py from tiny-teacher-init; if that
                             directory has no weights, the random init is built instead.
  builtin:tiny-teacher-init  LlamaForCausalLM, hidden 128, 4 layers, untied, vocab padded to x64.
  builtin:tiny-student       LlamaForCausalLM, hidden 64, 2 layers, tied, vocab = len(tokenizer).
  builtin:small-student      LlamaForCausalLM, hidden 96, 4 layers, tied (about half the teacher):
                             the second student of the demo experiment.

Random-init models come from a fixed seed and are built once into
$KD_HOME/builtin/<name> (KD_HOME defaults to ~/.cache/kd), with the tokenizer files beside them.
The teacher/student vocabulary padding mismatch is deliberate: it exercises the logit slicing
that real pairs (e.g. 32001 vs 32000 rows) need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

SCHEME = "builtin:"
ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
TEACHER_DIR = ASSETS / "teacher"
CHOICE_TEACHER_DIR = ASSETS / "choice-teacher"  # the teacher of the many-valid-answers task (kd/demo/choice.py)
_MARKER = "kd_builtin.json"
# Bump when the build recipe changes so stale caches are rebuilt.
_RECIPE_VERSION = 2  # 2: tiny-teacher is the shipped trained model; its init is tiny-teacher-init

_INIT = {
    "tiny-teacher-init": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        tie_word_embeddings=False,
        vocab_multiple=64,
        seed=1001,
    ),
}
_MODELS = {
    **_INIT,
    # Fallback when kd/demo/assets/teacher is absent: the untrained init under the teacher's name.
    "tiny-teacher": _INIT["tiny-teacher-init"],
    "tiny-choice-teacher": _INIT["tiny-teacher-init"],
    "tiny-student": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        tie_word_embeddings=True,
        vocab_multiple=1,
        seed=1002,
    ),
    "small-student": dict(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=288,
        tie_word_embeddings=True,
        vocab_multiple=1,
        seed=1003,
    ),
}


def builtin_names() -> tuple[str, ...]:
    """Every valid `builtin:` name, scheme included."""
    return tuple(SCHEME + n for n in ("tokenizer", *_MODELS))


def shipped_teacher() -> Path | None:
    """kd/demo/assets/teacher when it holds trained weights, else None."""
    return TEACHER_DIR if (TEACHER_DIR / "model.safetensors").is_file() else None


def kd_home() -> Path:
    """Cache root: $KD_HOME, else ~/.cache/kd (the library's kd.data.store.kd_home)."""
    from kd.data.store import kd_home as home

    return home()


def resolve_name(name: str) -> str:
    """The `builtin:` model source (kd.models.resolve finds it through the package's entry
    points): local directory for `builtin:<name>`, building it if needed."""
    return resolve(SCHEME + name)


def resolve(name_or_path: str) -> str:
    """Local directory for a `builtin:` name (building it if needed); anything else unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(SCHEME):
        return name_or_path
    name = name_or_path[len(SCHEME) :]
    if name == "tokenizer":
        return str(TOKENIZER_DIR)
    if name == "tiny-teacher" and shipped_teacher() is not None:
        return str(TEACHER_DIR)
    if name == "tiny-choice-teacher" and (CHOICE_TEACHER_DIR / "model.safetensors").is_file():
        return str(CHOICE_TEACHER_DIR)
    if name not in _MODELS:
        raise ValueError(f"unknown builtin {name_or_path!r}; valid: {', '.join(builtin_names())}")
    return str(_ensure_built(name))


def _fingerprint(name: str) -> dict:
    """What a cached build must match to be reused: recipe, spec and shipped tokenizer."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(TOKENIZER_DIR.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"name": name, "recipe": _RECIPE_VERSION, "spec": _MODELS[name], "tokenizer_sha256": h.hexdigest()}


def _is_complete(path: Path, name: str) -> bool:
    """A build is usable when its marker (written last) matches the current fingerprint and the
    model files are there (a build by an older kd under torch.distributed could lack them)."""
    try:
        return json.loads((path / _MARKER).read_text()) == _fingerprint(name) \
            and all((path / f).is_file() for f in ("config.json", "model.safetensors"))
    except (OSError, ValueError):
        return False


def _ensure_built(name: str) -> Path:
    """Return $KD_HOME/builtin/<name>, building it atomically unless a matching build exists."""
    final = kd_home() / "builtin" / name
    if _is_complete(final, name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _build(name, tmp)
        if final.exists() and not _is_complete(final, name):
            # Stale or broken build: move it aside first so the rename below can land.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            try:
                os.rename(final, stale / "old")
            except OSError:
                pass  # someone else moved or replaced it; the rename below decides
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race to another process: keep theirs if it is good.
            if not _is_complete(final, name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build(name: str, out: Path) -> None:
    """Write a seeded random-init model, its tokenizer files and the marker into `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = _MODELS[name]
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    m = spec["vocab_multiple"]
    vocab = -(-len(tok) // m) * m
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"],
        max_position_embeddings=512,
        tie_word_embeddings=spec["tie_word_embeddings"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float32",
    )
    # fork_rng keeps the caller's global RNG stream untouched by the seeded init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
    # Not save_pretrained: under torch.distributed it writes only on rank 0, and any rank may be
    # the one that builds (a rank that lost would leave a directory without weights).
    from safetensors.torch import save_file

    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    weights = model.state_dict()
    if config.tie_word_embeddings:  # stored once, under the name save_pretrained keeps
        for key in getattr(model, "_tied_weights_keys", None) or {}:
            weights.pop(key, None)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZER_DIR.iterdir():
        shutil.copyfile(f, out / f.name)
    # Written last: its presence means every other file is complete.
    (out / _MARKER).write_text(json.dumps(_fingerprint(name), indent=2, sort_keys=True) + "\n")
