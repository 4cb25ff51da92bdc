"""Load the tokenizer, the frozen teacher and the trainable student; check they agree."""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.metadata import entry_points
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd import templates
from kd.config import Config
from kd.errors import ModelError

# `<scheme>:<name>` model names are resolved by plugins registered under this entry-point group
# (pyproject.toml): the demo's `builtin:` models are one, so the library never imports the demo.
MODEL_SOURCES = "kd.model_sources"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return _DTYPES[name]


@functools.cache
def _sources() -> dict:
    return {ep.name: ep for ep in entry_points(group=MODEL_SOURCES)}


def resolve(name_or_path: str) -> str:
    """A local directory for a `<scheme>:<name>` a plugin provides (e.g. `builtin:tiny-student`,
    built on first use); any other string unchanged (a hub id or a local path)."""
    scheme, sep, name = name_or_path.partition(":") if isinstance(name_or_path, str) else ("", "", "")
    source = _sources().get(scheme) if sep else None
    if source is None:
        if scheme == "builtin":
            raise ModelError(f"{name_or_path!r}: builtin models come with the kd package's entry points; "
                             f"install it (pip install -e .)")
        return name_or_path
    try:
        return source.load()(name)
    except ValueError as e:  # an unknown name: the plugin's message lists the valid ones
        raise ModelError(str(e)) from None


def existing(name_or_path: str, key: str | None = None) -> str:
    """resolve(name_or_path), refusing in one line a local path that is not there (transformers
    would take it for a malformed hub id). A name with one slash and no leading ./ or / is a hub id."""
    path = resolve(name_or_path)
    local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    if local and not Path(path).expanduser().exists():
        raise ModelError(f"no such directory: {path}" + (f" ({key})" if key else ""))
    return str(Path(path).expanduser()) if local else path


def tokenizer_source(cfg: Config, role: str) -> str:
    """Where the teacher's or student's tokenizer comes from: <role>.tokenizer, else its model."""
    part = getattr(cfg, role)
    return part.tokenizer or part.name_or_path


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with equal hashes map ids alike."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_tokenizer(name_or_path: str, chat_template: str | None = None, key: str | None = None):
    path = existing(name_or_path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0][:300]}") from None
    if chat_template is not None:
        tok.chat_template = templates.resolve(chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def check_same_tokenizer(student_tok, teacher_tok, student_name: str, teacher_name: str) -> None:
    """Logit-level KD compares distributions entry by entry: the vocabularies must be identical.
    The refusal names the tokens that differ (often one special token a tokenizer class adds)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s, only_t = sorted(sv.keys() - tv.keys(), key=sv.get), sorted(tv.keys() - sv.keys(), key=tv.get)
        moved = sorted((k for k in sv.keys() & tv.keys() if sv[k] != tv[k]), key=sv.get)

        def some(tokens, ids=None):
            shown = ", ".join(repr(t) + (f" ({ids[t]})" if ids else "") for t in tokens[:3])
            return shown + (f" and {len(tokens) - 3} more" if len(tokens) > 3 else "")

        parts = [f"{len(tv)} vs {len(sv)} entries"]
        parts += [f"only in the teacher: {some(only_t, tv)}"] if only_t else []
        parts += [f"only in the student: {some(only_s, sv)}"] if only_s else []
        parts += [f"{len(moved)} with other ids, e.g. {some(moved)}"] if moved else []
        raise ModelError(
            f"teacher {teacher_name!r} and student {student_name!r} use different tokenizers ({'; '.join(parts)}); "
            f"logit distillation needs one vocabulary: if the models share it, choose one tokenizer for both "
            f"with student.tokenizer=<dir> or teacher.tokenizer=<dir>"
        )


def load_model(name_or_path: str, dtype: torch.dtype, attn_implementation: str | None, role: str):
    path = existing(name_or_path, f"{role}.name_or_path" if role in ("teacher", "student") else None)
    kwargs = dict(dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(f"cannot load {role} {name_or_path!r}: {str(e).splitlines()[0][:300]}") from None


def check_vocab(model, vocab_size: int, role: str) -> None:
    weight = model.get_output_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions keep the full shape here
    if rows < vocab_size:
        raise ModelError(f"{role} has {rows} output rows, fewer than the tokenizer's {vocab_size} tokens")


def load_tokenizers(cfg: Config, check_teacher: bool = True):
    """The student's tokenizer (the one used for data), after checking the teacher uses the same
    (check_teacher=False when training from a teacher cache: its manifest carries that check)."""
    tok = load_tokenizer(tokenizer_source(cfg, "student"), cfg.data.chat_template,
                         "student.tokenizer" if cfg.student.tokenizer else "student.name_or_path")
    if tok.chat_template is None:
        raise ModelError(
            f"tokenizer of {cfg.student.name_or_path!r} has no chat template; set data.chat_template "
            f"to {' or '.join(templates.BUILTIN)} or a Jinja template"
        )
    if check_teacher:
        t_tok = load_tokenizer(tokenizer_source(cfg, "teacher"), cfg.data.chat_template,
                               "teacher.tokenizer" if cfg.teacher.tokenizer else "teacher.name_or_path")
        check_same_tokenizer(tok, t_tok, tokenizer_source(cfg, "student"), tokenizer_source(cfg, "teacher"))
    return tok


def teacher_hidden_size(cfg: Config) -> int:
    """From the config file alone (sizes the teacher's DeepSpeed buckets before loading it)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(cfg.teacher.name_or_path)).hidden_size


def load_teacher(cfg: Config, vocab_size: int, device_type: str):
    """Frozen, eval mode, no grads."""
    teacher = load_model(cfg.teacher.name_or_path, resolve_dtype(cfg.teacher.dtype, device_type),
                         cfg.teacher.attn_implementation, "teacher")
    check_vocab(teacher, vocab_size, "teacher")
    return teacher.eval().requires_grad_(False)


def load_student(cfg: Config, vocab_size: int, device_type: str):
    student = load_model(cfg.student.name_or_path, resolve_dtype(cfg.student.dtype, device_type),
                         cfg.student.attn_implementation, "student")
    check_vocab(student, vocab_size, "student")
    if cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    if cfg.student.lora.enabled:
        from kd import lora

        student = lora.wrap(student, cfg.student.lora)
    return student.train()


def load_all(cfg: Config, device_type: str):
    """-> (tokenizer, teacher, student), without any sharding (tests, tools)."""
    tok = load_tokenizers(cfg)
    return tok, load_teacher(cfg, len(tok), device_type), load_student(cfg, len(tok), device_type)
