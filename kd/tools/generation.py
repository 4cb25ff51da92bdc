"""The one batched generation routine (kd.generate, kd.evaluate and kd.accuracy use it): chat
prompts rendered with the template, sorted by length, greedy or sampled with a seeded, repeatable
RNG; and loading a model for it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kd import templates
from kd.errors import KDError
from kd.samples import generate_ids, stop_ids
from kd.tools.prompt_records import prompt_messages
from kd.tools.shards import shard, unshard

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
