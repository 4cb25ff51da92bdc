"""Dataset generation from a teacher: greedy responses to prompts, written as a distillation set.

    python -m kd.generate --model builtin:tiny-teacher --input data/demo/train.jsonl --output gen.jsonl
    accelerate launch -m kd.generate --model <teacher> --input in.jsonl --output out.jsonl

Each input record needs a `prompt`; `system` (the strategy instruction) is optional. The model
sees the record's own instruction (`--system strategy`), GENERIC_SYSTEM (`generic`) or no
system message (`none`). Output records keep every input field, in input order, with `response`
replaced by the generated text, so the file feeds straight into kd.train.

Under `accelerate launch` every rank takes the strided shard records[rank::world], writes it to a
shard file beside --output, and rank 0 interleaves the shards back into input order. Shard files
need a filesystem all ranks see (one machine, or a shared mount across nodes).

`generate_texts` is the one batched generation routine; kd.accuracy uses it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from kd.cli import one_line_errors, quiet_libraries
from kd.errors import DataError, KDError

SYSTEM_MODES = ("strategy", "generic", "none")
# The system message of `--system generic`: the usual neutral assistant line (the demo data uses
# the same text for its erased student view).
GENERIC_SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------- records


def read_records(path: str, limit: int | None = None, required: tuple[str, ...] = ("prompt",),
                 validate=None) -> list[dict]:
    """JSONL records from `path` (blank lines skipped), the first `limit` if given.

    Every record must be a JSON object whose `required` fields are strings and whose `system`,
    if present, is a string or null; `validate(record)` may return a further complaint. Errors
    are DataErrors naming the file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file not found: {path}")
    out: list[dict] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            for key in required:
                if not isinstance(rec.get(key), str):
                    what = "missing" if rec.get(key) is None else "not a string:"
                    raise DataError(f"{path}:{lineno}: {what} '{key}'")
            if rec.get("system") is not None and not isinstance(rec["system"], str):
                raise DataError(f"{path}:{lineno}: 'system' must be a string")
            problem = validate(rec) if validate else None
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def prompt_messages(record: dict, system_mode: str) -> list[dict]:
    """Chat messages up to the user turn. `strategy` uses the record's own `system` (no system
    message if it has none), `generic` uses GENERIC_SYSTEM, `none` drops the system message."""
    if system_mode == "strategy":
        system = record.get("system") or None
    elif system_mode == "generic":
        system = GENERIC_SYSTEM
    elif system_mode == "none":
        system = None
    else:
        raise ValueError(f"system_mode must be one of {SYSTEM_MODES}, got {system_mode!r}")
    msgs = [dict(role="system", content=system)] if system else []
    return msgs + [dict(role="user", content=record["prompt"])]


def shard(items: list, rank: int, world: int) -> list:
    """The strided share of `items` that rank `rank` of `world` handles."""
    return items[rank::world]


def unshard(shards: list[list], n: int) -> list:
    """Inverse of `shard`: interleave per-rank lists back into the original order of `n` items."""
    world = len(shards)
    for r, s in enumerate(shards):
        if len(s) != len(range(r, n, world)):
            raise RuntimeError(f"rank {r} returned {len(s)} items, expected {len(range(r, n, world))}")
    return [shards[i % world][i // world] for i in range(n)]


# --------------------------------------------------------------------------- generation


def _stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any eos the model's generation config names (e.g. Llama-3 lists
    several); a model stopping early on its own end-of-turn is what a chat model does anyway."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        if i not in ids:
            ids.append(i)
    return ids


def generate_texts(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                   max_new_tokens: int = 200) -> list[str]:
    """Greedy completions of chat `conversations` (each ending on the user turn), in order.

    Prompts are rendered with the tokenizer's chat template (add_generation_prompt=True), sorted
    by length so batches carry little padding, left-padded by hand (the tokenizer's padding_side
    is left alone) and run through `model.generate`, stopping at eos. Returns the new text only,
    decoded without special tokens and stripped.
    """
    import torch
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not conversations:
        return []
    if tokenizer.chat_template is None:
        raise KDError("the tokenizer has no chat template; generation needs one")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The template already writes any bos it wants, so the tokenizer must not add another.
    prompts = [
        tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        for c in conversations
    ]
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=_stop_ids(model, tokenizer), pad_token_id=pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for b, i in enumerate(idx):
                    n = len(prompts[i])
                    ids[b, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                    mask[b, width - n :] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
                decoded = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    texts[i] = text.strip()
    finally:
        model.train(was_training)
    return texts


def generate_for_records(model, tokenizer, records: list[dict], system_mode: str, batch_size: int = 32,
                         max_new_tokens: int = 200, state=None) -> list[str]:
    """Greedy responses for `records` under `system_mode`, in record order.

    With an accelerate `state` of several processes, each rank generates its strided shard and
    every rank gets all texts back (one all-gather of strings); without one, runs locally.
    """
    world = 1 if state is None else state.num_processes
    rank = 0 if state is None else state.process_index
    mine = shard(records, rank, world)
    texts = generate_texts(model, tokenizer, [prompt_messages(r, system_mode) for r in mine], batch_size,
                           max_new_tokens)
    if world == 1:
        return texts
    from accelerate.utils import gather_object

    # gather_object flattens lists, so wrap each rank's list to keep the shards apart
    return unshard(gather_object([texts]), len(records))


# --------------------------------------------------------------------------- files


def write_jsonl_atomic(path: Path, records) -> None:
    """Write records as JSONL to a temp file in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        # mkstemp creates 0600; give the file the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_path(output: Path, rank: int, world: int) -> Path:
    # Deterministic names: a rerun overwrites its own stale shards before rank 0 reads them.
    return output.parent / f".{output.name}.shard-{rank}-of-{world}.jsonl"


def _read_shard(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_state():
    """accelerate's PartialState; gloo on machines without CUDA so CPU multi-process runs form one
    group (a plain `python -m` run is a single process)."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    # backend only when there is a group to form: a single process with a backend set would ask
    # torch.distributed for a world size it never initialised
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and multi else {}))


def load_for_generation(name: str, dtype: str, device):
    """(tokenizer, model in eval mode on `device`) for a hub id, local path or builtin: name."""
    from kd.models import load_model, load_tokenizer, resolve_dtype

    tok = load_tokenizer(name)
    if tok.chat_template is None:
        raise KDError(f"tokenizer of {name!r} has no chat template")
    model = load_model(name, resolve_dtype(dtype, device.type), None, "model")
    return tok, model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    """The generate command; returns the number of records written (on every rank)."""
    output = Path(args.output)
    if output.is_dir():
        raise DataError(f"--output {args.output} is a directory; give a .jsonl file path")
    records = read_records(args.input, args.limit)
    quiet_libraries()  # after the cheap input checks, which need no heavy imports
    state = make_state()
    world, rank = state.num_processes, state.process_index
    tok, model = load_for_generation(args.model, args.dtype, state.device)
    mine = shard(records, rank, world)
    if state.is_main_process:
        print(f"kd.generate: {len(records)} records, {world} process(es), system={args.system}", file=sys.stderr)
    texts = generate_texts(model, tok, [prompt_messages(r, args.system) for r in mine], args.batch_size,
                           args.max_new_tokens)
    write_jsonl_atomic(_shard_path(output, rank, world), ({**r, "response": t} for r, t in zip(mine, texts)))
    state.wait_for_everyone()
    if state.is_main_process:
        paths = [_shard_path(output, r, world) for r in range(world)]
        merged = unshard([_read_shard(p) for p in paths], len(records))
        write_jsonl_atomic(output, merged)
        for p in paths:
            p.unlink(missing_ok=True)
        print(f"wrote {len(merged)} records to {output}")
    state.wait_for_everyone()
    return len(records)


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s!r}")
    return v


class ArgParser(argparse.ArgumentParser):
    """argparse with usage errors as one `kd: error:` line (exit 2), like every other user error."""

    def error(self, message):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"kd: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(ap: argparse.ArgumentParser, system_required: bool = False) -> None:
    """Flags shared by kd.generate and kd.accuracy."""
    ap.add_argument("--model", required=True, help="hub id, local path or builtin:<name>")
    ap.add_argument("--system", choices=SYSTEM_MODES, required=system_required,
                    default=None if system_required else "strategy",
                    help="system message: the record's strategy instruction, the generic one, or none")
    ap.add_argument("--batch-size", type=_positive, default=32)
    ap.add_argument("--max-new-tokens", type=_positive, default=200)
    ap.add_argument("--limit", type=_positive, default=None, help="use only the first N records")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgParser(prog="python -m kd.generate",
                                 description="Generate a distillation dataset from a teacher (greedy).")
    add_common_args(ap)
    ap.add_argument("--input", required=True, help="JSONL records with a 'prompt' (and optional 'system')")
    ap.add_argument("--output", required=True, help="JSONL written with 'response' replaced")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one `kd: error:` line on stderr and exit status 2."""
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
