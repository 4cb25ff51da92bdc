"""Chat templates for tokenizers that ship none (base models such as Llama-2-*-hf).

`data.chat_template` may name one of these, give a Jinja string, or be left unset to use the
tokenizer's own template.
"""

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
    """A builtin name or a Jinja string -> Jinja string (None stays None)."""
    if template is None:
        return None
    return BUILTIN.get(template, template)
