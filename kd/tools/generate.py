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

`generate_texts` / `generate_samples` are the one batched generation routine; kd.accuracy and
kd.evaluate use them too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kd import templates
from kd.cli import one_line_errors, quiet_libraries
from kd.errors import DataError, KDError
from kd.integrity import source_identity, text_digest
from kd.samples import generate_ids, stop_ids

SYSTEM_MODES = ("strategy", "generic", "none")
# The system message of `--system generic`: the usual neutral assistant line (the demo data uses
# the same text for its erased student view).
GENERIC_SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------- records


def read_records(path: str, limit: int | None = None, required: tuple[str, ...] = (),
                 validate=None, split: str = "train") -> list[dict]:
    """Records from `path`, the first `limit` if given: JSONL read line by line (blank lines
    skipped), or .json / .parquet / a save_to_disk directory through kd.data's loader.

    Every record must be a JSON object whose `required` fields are strings and whose `system`,
    if present, is a string or null; `validate(record)` may return a further complaint. Errors
    are DataErrors naming the file and line (row). `split` is the one taken from a DatasetDict.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"input file not found: {path}")
    out: list[dict] = []
    for where, rec in _rows(p, limit, split):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        for key in required:
            if not isinstance(rec.get(key), str):
                what = "missing" if rec.get(key) is None else "not a string:"
                raise DataError(f"{where}: {what} '{key}'")
        if rec.get("system") is not None and not isinstance(rec["system"], str):
            raise DataError(f"{where}: 'system' must be a string")
        problem = validate(rec) if validate else None
        if problem:
            raise DataError(f"{where}: {problem}")
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _rows(p: Path, limit: int | None, split: str):
    if p.suffix == ".jsonl" and p.is_file():
        from kd.data.records import text_problem

        if problem := text_problem(p):
            raise DataError(problem)
        with open(p, encoding="utf-8") as fh:
            n = 0
            for lineno, line in enumerate(fh, 1):
                if limit is not None and n >= limit:
                    return
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
                n += 1
                yield f"{p}:{lineno}", rec
        return
    from kd.data.records import load_records

    ds = load_records([str(p)], split=split)
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        row = ds[i]
        where = f"{row.pop('_source')}:{row.pop('_row')}"
        yield where, {k: v for k, v in row.items() if v is not None or k == "system"}


def prompt_conversation(record: dict, where: str = "record") -> tuple[str | None, list[dict]]:
    """-> (strategy instruction or None, the turns to answer: up to and including the last user
    turn). Any record kd.train reads; a prompt record needs no response, and a conversation may end
    on the user turn to answer (one ending on an assistant turn has that turn answered anew)."""
    from kd.data.records import ROLES, to_conversation

    msgs = record.get("messages") if record.get("messages") is not None else record.get("conversations")
    if msgs is None:
        if isinstance(record.get("prompt"), str) and record.get("response") is None:
            record = {**record, "response": ""}
        system, turns = to_conversation(record, where)
        return system, turns[:-1]
    last = msgs[-1] if isinstance(msgs, list) and msgs else None
    role = last.get("role", last.get("from")) if isinstance(last, dict) else None
    if isinstance(role, str) and ROLES.get(role.lower()) == "user":  # the turn to answer is the last
        record = {**record, "messages": [*msgs, {"role": "assistant", "content": ""}]}
    system, turns = to_conversation(record, where)
    return system, turns[:-1]


def _promptable(record: dict) -> str | None:
    try:
        prompt_conversation(record, "@")
    except DataError as e:
        return str(e).removeprefix("@: ")
    return None


def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """read_records for generation: each record must give a conversation to answer."""
    return read_records(path, limit, validate=_promptable)


def with_response(record: dict, text: str) -> dict:
    """The record with `text` as its answer: `response` for a prompt record, the last assistant
    turn (replaced, or appended after the final user turn) for a conversation, in its own style."""
    key = "messages" if record.get("messages") is not None else "conversations" if record.get("conversations") \
        is not None else None
    if key is None:
        return {**record, "response": text}
    from kd.data.records import ROLES

    msgs = [dict(m) for m in record[key]]
    sharegpt = "from" in msgs[-1]
    role = ROLES.get(str(msgs[-1].get("from" if sharegpt else "role")).lower())
    if role == "assistant":
        msgs[-1]["value" if sharegpt else "content"] = text
    else:
        msgs.append({"from": "gpt", "value": text} if sharegpt else {"role": "assistant", "content": text})
    return {**record, key: msgs}


def prompt_messages(record: dict, system_mode: str) -> list[dict]:
    """Chat messages up to the user turn to answer. `strategy` uses the record's own instruction
    (no system message if it has none), `generic` uses GENERIC_SYSTEM, `none` drops it."""
    if system_mode not in SYSTEM_MODES:
        raise ValueError(f"system_mode must be one of {SYSTEM_MODES}, got {system_mode!r}")
    own, turns = prompt_conversation(record)
    system = {"strategy": own or None, "generic": GENERIC_SYSTEM, "none": None}[system_mode]
    return ([dict(role="system", content=system)] if system else []) + turns


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


_stop_ids = stop_ids


@dataclass(frozen=True)
class Sampling:
    """Decoding: greedy when temperature is 0, else sampling with temperature and top-p; `n`
    answers per prompt; `seed` makes a run repeatable (each batch is seeded from it and the input
    index of its first prompt, in a forked RNG: the same prompts and batch size draw the same
    samples whatever else the process did, and a resumed run continues in the same way)."""

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.n < 1:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and n >= 1")
        if self.temperature == 0 and self.n > 1:
            raise KDError("several samples per prompt need a temperature > 0 (greedy decoding gives one answer)")


GREEDY = Sampling()


def generate_samples(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                     max_new_tokens: int = 200, sampling: Sampling = GREEDY, on_batch=None,
                     progress=None, keys: list[int] | None = None) -> list[list[str]]:
    """`sampling.n` completions of each chat conversation (ending on the user turn), in order.

    Prompts are rendered with the tokenizer's chat template (add_generation_prompt=True), sorted
    by length so batches carry little padding, left-padded by hand (the tokenizer's padding_side
    is left alone) and run through `model.generate`, stopping at eos. Returns the new text only,
    decoded without special tokens and stripped. `on_batch(indices, texts)` is called after each
    batch (e.g. to append it to a file); `progress` (a tqdm bar) is advanced by prompts done.
    `keys` (default: positions) name the prompts for seeding, e.g. their index in the input file.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not conversations:
        return []
    if tokenizer.chat_template is None:
        raise KDError("the tokenizer has no chat template; generation needs one (--chat-template)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The template already writes any bos it wants, so the tokenizer must not add another.
    prompts = [
        tokenizer(templates.render(tokenizer, c, f"prompt {i + 1}", add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        for i, c in enumerate(conversations)
    ]
    decode = lambda outs: [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]  # noqa: E731
    texts_of = None if on_batch is None else (lambda idx, outs: on_batch(idx, [decode(o) for o in outs]))
    outs = generate_ids(model, prompts, pad_id, stop_ids(model, tokenizer), max_new_tokens, batch_size,
                        sampling.temperature, sampling.top_p, sampling.n, sampling.seed, keys, texts_of, progress)
    return [decode(o) for o in outs]


def generate_texts(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                   max_new_tokens: int = 200, sampling: Sampling = GREEDY) -> list[str]:
    """One completion per conversation (greedy unless `sampling` says otherwise); see generate_samples."""
    return [t[0] for t in generate_samples(model, tokenizer, conversations, batch_size, max_new_tokens,
                                           Sampling(sampling.temperature, sampling.top_p, 1, sampling.seed))]


def generate_for_records(model, tokenizer, records: list[dict], system_mode: str, batch_size: int = 32,
                         max_new_tokens: int = 200, state=None, sampling: Sampling = GREEDY) -> list[list[str]] | list[str]:
    """Responses for `records` under `system_mode`, in record order (a list of `sampling.n`
    texts per record when sampling.n > 1, else one text per record).

    With an accelerate `state` of several processes, each rank generates its strided shard and
    every rank gets all texts back (one all-gather of strings); without one, runs locally.
    """
    world = 1 if state is None else state.num_processes
    rank = 0 if state is None else state.process_index
    mine = shard(records, rank, world)
    texts = generate_samples(model, tokenizer, [prompt_messages(r, system_mode) for r in mine], batch_size,
                             max_new_tokens, sampling)
    if sampling.n == 1:
        texts = [t[0] for t in texts]
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
    # Deterministic names: a rerun with the same world size appends to its own shard.
    return output.parent / f".{output.name}.shard-{rank}-of-{world}.jsonl"


def _shard_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.shard-*-of-*.jsonl"))


def _settings_path(output: Path) -> Path:
    return output.parent / f".{output.name}.settings.json"


def _shard_line(index: int, texts: list[str]) -> str:
    """One finished record as a shard line, with a checksum of its content."""
    row = json.dumps({"index": index, "texts": texts}, ensure_ascii=False)
    return json.dumps({"index": index, "texts": texts, "xxh3_128": text_digest(row)}, ensure_ascii=False) + "\n"


def _read_shard(path: Path) -> tuple[list[dict], int]:
    """(finished rows of a shard, lines that fail their checksum). A line cut short by a kill is
    ignored; a damaged one is not trusted: its record is generated again."""
    out, damaged = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                row = json.loads(line)
                ok = _shard_line(row["index"], row["texts"]) == line
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if ok:
                out.append(row)
            else:
                damaged += 1
    return out, damaged


def _drop_partial_line(path: Path) -> None:
    """Cut a shard back to its last complete line (a kill mid-write) before appending to it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)


def _done(output: Path, say=None) -> dict[int, dict]:
    """Records already generated by an interrupted run, by input index; damaged lines are said
    (when `say` is given) and left to be generated again."""
    done, damaged = {}, 0
    for path in _shard_files(output):
        rows, bad = _read_shard(path)
        damaged += bad
        for row in rows:
            done[row["index"]] = row
    if damaged and say is not None:
        say(f"kd.generate: {damaged} line(s) of the shard files fail their checksum; those records are "
            f"generated again")
    return done


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


def load_for_generation(name: str, dtype: str, device, chat_template: str | None = None):
    """(tokenizer, model in eval mode on `device`) for a hub id, local path or builtin: name."""
    from kd.models import load_model, load_tokenizer, resolve_dtype

    tok = load_tokenizer(name, chat_template)
    if tok.chat_template is None:
        raise KDError(f"tokenizer of {name!r} has no chat template; pass --chat-template chatml, llama2 or a "
                      f"Jinja template")
    model = load_model(name, resolve_dtype(dtype, device.type), None, "model")
    return tok, model.to(device).eval()


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
