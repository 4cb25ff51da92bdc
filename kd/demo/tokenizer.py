"""Build the project's tiny byte-level BPE tokenizer into kd/demo/assets/tokenizer.

    python -m kd.demo.tokenizer [OUT_DIR]

Trained on a fixed, seeded sample of the demo tasks (kd.tasks), so rebuilding gives
byte-identical files. Conventions:

* Special ids: <pad>=0, <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4, then the 256 byte tokens.
* Digits are always split one per token (Digits(individual_digits=True) before ByteLevel), so
  numbers keep a digit-level structure that small models can learn arithmetic on.
* eos_token is <|im_end|>: every chat turn ends with it, so generation stops at the end of the
  assistant turn. <s> and </s> are kept as specials for plain-text use but nothing adds them:
  `tok(text)` and the chat template add no BOS/EOS.
* chat_template is ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message;
  add_generation_prompt appends "<|im_start|>assistant\\n".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

PAD, BOS, EOS_TEXT, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS_TEXT, IM_START, IM_END]
# An upper bound: BPE stops once no pair occurs twice (452 entries on the current corpus). The
# tests keep len(tokenizer) off multiples of 64, so the teacher's padded embedding differs.
VOCAB_SIZE = 520
CORPUS_SEED = 20240601
CORPUS_RECORDS = 2000

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    """Training text: demo records rendered in chat layout, markers left out (they are specials)."""
    from kd.demo import tasks

    texts = []
    for rec in tasks.generate(CORPUS_RECORDS, CORPUS_SEED):
        for system in (rec["system"], tasks.GENERIC_SYSTEM):
            texts.append(f"system\n{system}\nuser\n{rec['prompt']}\nassistant\n{rec['response']}\n")
    return texts


def train_tokenizer():
    """Train the raw `tokenizers.Tokenizer` (deterministic: single-threaded, fixed corpus)."""
    # Rayon parallelism can reorder equal-count merges; one thread keeps the output stable.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build(out_dir: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Train and save the tokenizer (HF layout) into `out_dir`; returns the directory."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[EOS_TEXT, IM_START],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    _make_config_portable(out / "tokenizer_config.json")
    return out


def _make_config_portable(path: Path) -> None:
    """Rewrite the 5.x-only names so transformers 4.x loads the files too (5.x accepts both)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in cfg:
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: optional output directory, default kd/demo/assets/tokenizer."""
    argv = sys.argv[1:] if argv is None else argv
    out = build(argv[0] if argv else DEFAULT_DIR)
    print(f"tokenizer written to {out}")


if __name__ == "__main__":
    main()
