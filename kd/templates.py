"""Chat templates for tokenizers that ship none (base models such as Llama-2-*-hf).

`data.chat_template` may name one of these, give a Jinja string or the path of a .jinja file
(e.g. one of trl's `chat_templates/*_training.jinja`), or be left unset to use the tokenizer's
own template.
"""

import os

from kd.errors import DataError

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 chat format: the system message sits inside the first [INST] block.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

BUILTIN = {"chatml": CHATML, "llama2": LLAMA2}


def resolve(template: str | None) -> str | None:
    """A builtin name, a .jinja file or a Jinja string -> Jinja string (None stays None)."""
    if template is None:
        return None
    if template in BUILTIN:
        return BUILTIN[template]
    # A Jinja string always holds "{%" or "{{"; anything else that looks like a path is one.
    if "{" not in template and (template.endswith((".jinja", ".j2")) or os.sep in template):
        if not os.path.isfile(template):
            raise DataError(f"no such file: {template} (data.chat_template; a builtin name "
                            f"({', '.join(BUILTIN)}), a Jinja string or a .jinja file)")
        try:
            with open(template, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {template} (data.chat_template): {e}") from None
    return template


def render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    """The conversation as the template's text; a template that fails on it (a Jinja error, a
    sandbox violation, its own raise_exception) is a DataError naming the record."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 (jinja2's TemplateError family, ValueError, TypeError, ...)
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where}: the chat template fails on it ({type(e).__name__}: {why}); check "
                        f"data.chat_template or the tokenizer's own template") from None
