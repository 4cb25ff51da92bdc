"""Load the tokenizer, the frozen teacher and the trainable student; check they agree."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd import demo, templates
from kd.config import Config
from kd.errors import ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    path = demo.resolve(name_or_path)
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
    """Logit-level KD compares distributions entry by entry: the vocabularies must be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = len(sv.keys() - tv.keys())
        only_t = len(tv.keys() - sv.keys())
        moved = sum(1 for k in sv.keys() & tv.keys() if sv[k] != tv[k])
        raise ModelError(
            f"teacher {teacher_name!r} and student {student_name!r} use different tokenizers "
            f"({len(tv)} vs {len(sv)} entries, {only_t} only in teacher, {only_s} only in student, "
            f"{moved} with different ids); logit distillation needs one vocabulary"
        )


def load_model(name_or_path: str, dtype: torch.dtype, attn_implementation: str | None, role: str):
    path = demo.resolve(name_or_path)
    kwargs = dict(dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(f"cannot load {role} {name_or_path!r}: {str(e).splitlines()[0][:300]}") from None


def check_vocab(model, vocab_size: int, role: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ModelError(f"{role} has {rows} output rows, fewer than the tokenizer's {vocab_size} tokens")


def load_all(cfg: Config, device_type: str):
    """-> (tokenizer, teacher, student). The teacher is frozen and in eval mode."""
    tok = load_tokenizer(cfg.student.name_or_path, cfg.data.chat_template)
    if tok.chat_template is None:
        raise ModelError(
            f"tokenizer of {cfg.student.name_or_path!r} has no chat template; set data.chat_template "
            f"to {' or '.join(templates.BUILTIN)} or a Jinja template"
        )
    vocab = len(tok)
    t_tok = load_tokenizer(cfg.teacher.name_or_path, cfg.data.chat_template)
    check_same_tokenizer(tok, t_tok, cfg.student.name_or_path, cfg.teacher.name_or_path)
    teacher = load_model(cfg.teacher.name_or_path, resolve_dtype(cfg.teacher.dtype, device_type),
                         cfg.teacher.attn_implementation, "teacher")
    check_vocab(teacher, vocab, "teacher")
    teacher.eval().requires_grad_(False)
    student = load_model(cfg.student.name_or_path, resolve_dtype(cfg.student.dtype, device_type),
                         cfg.student.attn_implementation, "student")
    check_vocab(student, vocab, "student")
    if cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    student.train()
    return tok, teacher, student
