"""Dataset generation from a teacher: responses to prompts, written as a distillation set.

    python -m kd.generate --model builtin:tiny-teacher --input data/demo/train.jsonl --output gen.jsonl
    python -m kd.generate --model meta-llama/Llama-2-70b-hf --chat-template llama2 --input chats.jsonl \
        --output gen.jsonl --temperature 0.7 --top-p 0.9 --num-samples 4 --seed 1
    accelerate launch -m kd.generate --model <teacher> --input in.jsonl --output out.jsonl

Input: every record format kd.train reads ({system?, prompt, response?}, `messages`, ShareGPT
`conversations`; .jsonl, .json, .parquet or a save_to_disk directory). A conversation is answered
after its last user turn: one ending on an assistant turn has that turn regenerated. The model sees
the record's own instruction (`--system strategy`), GENERIC_SYSTEM (`generic`) or no system message
(`none`). Output records keep every input field, in input order, with the answer in `response` (or
as the conversation's last assistant turn), so the file feeds straight into kd.train. Decoding is
greedy by default; `--temperature` > 0 samples (with `--top-p`), `--num-samples` answers per
record (each written as its own record with a `sample` index), seeded by `--seed`.

Each rank appends finished batches to a shard file beside --output; rank 0 merges the shards into
input order at the end. An interrupted run is resumed by rerunning the same command: records already
in the shard files are not generated again (a run with other settings starts afresh, and says so).
Shard files need a filesystem all ranks see (one machine, or a shared mount across nodes).

The generation routine itself is kd/tools/generation.py (kd.accuracy and kd.evaluate use it
too); prompt records are read by kd/tools/prompt_records.py, shard files kept by kd/tools/shards.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kd.cli import one_line_errors, quiet_libraries
from kd.errors import DataError, KDError
from kd.integrity import source_identity
from kd.tools.generation import Sampling, generate_samples, load_for_generation, make_state
from kd.tools.prompt_records import SYSTEM_MODES, prompt_messages, read_prompts, with_response
from kd.tools.shards import (_done, _drop_partial_line, _settings_path, _shard_files, _shard_line, _shard_path,
                             shard, write_jsonl_atomic)

def sampling_from(args: argparse.Namespace) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_p, args.num_samples, args.seed)
    except ValueError as e:
        raise KDError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """The generate command; returns the number of records written (on every rank)."""
    from tqdm import tqdm

    output = Path(args.output)
    if output.is_dir():
        raise DataError(f"--output {args.output} is a directory; give a .jsonl file path")
    records = read_prompts(args.input, args.limit)
    sampling = sampling_from(args)
    quiet_libraries()  # after the cheap input checks, which need no heavy imports
    state = make_state()
    world, rank = state.num_processes, state.process_index
    settings = {k: getattr(args, k) for k in ("model", "input", "system", "max_new_tokens", "limit", "dtype",
                                               "chat_template", "temperature", "top_p", "num_samples", "seed")}
    # keyed on the input's content: prompts edited between a kill and the rerun are new prompts
    settings["input_content"] = source_identity(args.input) if state.is_main_process else None
    if state.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(_settings_path(output).read_text()) if _settings_path(output).is_file() else None
        if _shard_files(output) and previous != settings:
            changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
            print(f"kd.generate: an interrupted run with other settings ({', '.join(changed)}) left shard "
                  f"files; starting afresh", file=sys.stderr)
            for p in _shard_files(output):
                p.unlink()
        _settings_path(output).write_text(json.dumps(settings))
    state.wait_for_everyone()
    done = _done(output, say=(lambda m: print(m, file=sys.stderr)) if state.is_main_process else None)
    todo = [i for i in range(len(records)) if i not in done]
    mine = shard(todo, rank, world)
    tok, model = load_for_generation(args.model, args.dtype, state.device, args.chat_template)
    if state.is_main_process:
        resumed = f", {len(done)} already done by an interrupted run" if done else ""
        print(f"kd.generate: {len(records)} records{resumed}, {world} process(es), system={args.system}, "
              f"{'greedy' if sampling.temperature == 0 else f'T={sampling.temperature:g} top-p={sampling.top_p:g}'}"
              f"{f', {sampling.n} samples each' if sampling.n > 1 else ''}", file=sys.stderr)
    _drop_partial_line(_shard_path(output, rank, world))
    with open(_shard_path(output, rank, world), "a", encoding="utf-8") as fh, \
            tqdm(total=len(mine), desc="generate (rank 0)", unit="prompt", disable=not state.is_main_process or
                 not args.progress, file=sys.stderr) as bar:
        def append(idx, texts):
            for i, samples in zip(idx, texts):
                fh.write(_shard_line(mine[i], samples))
            fh.flush()

        generate_samples(model, tok, [prompt_messages(records[i], args.system) for i in mine], args.batch_size,
                         args.max_new_tokens, sampling, on_batch=append, progress=bar, keys=mine)
    state.wait_for_everyone()
    written = len(records) * sampling.n
    if state.is_main_process:
        done = _done(output)
        missing = [i for i in range(len(records)) if i not in done]
        if missing:
            raise KDError(f"{len(missing)} records have no generation (first: input record {missing[0] + 1}); rerun "
                          f"the same command to finish them")
        merged = []
        for i, rec in enumerate(records):
            for j, text in enumerate(done[i]["texts"]):
                merged.append({**with_response(rec, text), **({"sample": j} if sampling.n > 1 else {})})
        write_jsonl_atomic(output, merged)
        for p in _shard_files(output):
            p.unlink(missing_ok=True)
        _settings_path(output).unlink(missing_ok=True)
        print(f"wrote {len(merged)} records to {output}")
    state.wait_for_everyone()
    return written


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


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s!r}")
    return v


def _non_negative(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s!r}")
    return v


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temperature", type=_non_negative, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--top-p", type=_fraction, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ap.add_argument("--num-samples", type=_positive, default=1, help="answers per record (needs --temperature > 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    ap.add_argument("--chat-template", default=None,
                    help="chatml, llama2 or a Jinja template, for a model whose tokenizer has none")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_common_args(ap: argparse.ArgumentParser, system_required: bool = False) -> None:
    """Flags shared by kd.generate, kd.evaluate and kd.accuracy."""
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
                                 description="Generate a distillation dataset from a teacher.")
    add_common_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--input", required=True, help="records: prompt/response, messages or conversations "
                                                   "(.jsonl, .json, .parquet or a save_to_disk directory)")
    ap.add_argument("--output", required=True, help="JSONL written with each record's answer")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one `kd: error:` line on stderr and exit status 2."""
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
