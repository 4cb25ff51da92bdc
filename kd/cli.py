"""Command-line plumbing shared by every `python -m kd.<tool>`: override parsing, one-line
errors, quiet libraries. Entry points import this; no library module does."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from kd.errors import KDError


def split_overrides(rest: list[str]) -> list[str]:
    """`key=value`, `--key=value` and `--key value` -> ["key=value" or "--key=value", ...]
    (kd.config.load_config accepts both spellings; a W&B sweep agent passes `--key=value`)."""
    overrides, i = [], 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{a}={rest[i + 1]}")
            i += 2
        else:
            overrides.append(a)
            i += 1
    return overrides


def parse_args(argv: list[str] | None, prog: str = "kd.train",
               description: str = "Distil a frozen teacher into a student.") -> tuple[str | None, list[str]]:
    """--config FILE plus config overrides -> (config path or None, overrides)."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 epilog="Overrides: key=value or --key=value, e.g. loss.temperature=2.0")
    ap.add_argument("--config", help="YAML file with config values (see kd/config/schema.py)")
    args, rest = ap.parse_known_args(argv)
    return args.config, split_overrides(rest)


def quiet_libraries() -> None:
    """Per-file progress bars and notices from datasets/transformers drown our own lines."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DeepSpeed's deprecated collectives
    # datasets reads this when it is imported; if it already is, switch its bars off directly
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def one_line_errors():
    """Entry points: a KDError becomes `kd: error: ...` on stderr (once, from rank 0: every rank
    fails the same way) and exit status 2 (3 for non-finite values); a Ctrl-C that is not a
    training run's stop request (before training starts, or a second one) is one line, exit 130."""
    try:
        yield
    except KDError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("kd: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        sys.exit(130)
