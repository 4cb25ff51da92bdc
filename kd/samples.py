"""Batched generation from token ids, and the few sample generations logged at each evaluation.

`generate_ids` is the one decoding routine: kd.generate, kd.evaluate and kd.accuracy reach it
through kd.tools.generate (which renders chat prompts first); the training loop calls `eval_samples`
with `log.samples=N`, which decodes the student's answers to the first N eval examples from their
tokenised student view, so what is shown is exactly what the student is trained and scored on.
"""

from __future__ import annotations

import torch


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any eos the model's generation config names (e.g. Llama-3 lists
    several); a model stopping early on its own end-of-turn is what a chat model does anyway."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        if i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], pad_id: int, eos_ids: list[int], max_new_tokens: int,
                 batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0,
                 keys: list[int] | None = None, on_batch=None, progress=None, synced: bool = False,
                 keep_eos: bool = False) -> list[list[list[int]]]:
    """`n` continuations (new token ids, up to eos; the eos itself with `keep_eos`) of each prompt,
    in prompt order.

    Prompts are sorted by length so batches carry little padding and left-padded by hand. Greedy
    when temperature is 0, else sampled with temperature and top-p; each batch draws in a forked
    RNG seeded from `seed` and the smallest of its `keys` (default: prompt positions), so a run
    repeats itself whatever else the process did. `on_batch(indices, outputs)` after each batch;
    `progress` (tqdm) advanced by prompts done. `synced`: every rank runs generate together (a
    ZeRO-3 partitioned model gathers its layers collectively).
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                           temperature=temperature if sample else None, top_p=top_p if sample else None,
                           top_k=None, num_return_sequences=n, eos_token_id=eos_ids, pad_token_id=pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[list[int]] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[b, width - len(prompts[i]):] = 1
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + min(keys[i] if keys else i for i in idx))
                # use_cache: a student trained with gradient checkpointing has it off in its config
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                     use_cache=True, **({"synced_gpus": True} if synced else {})).cpu()
            for b, i in enumerate(idx):
                out[i] = [_until_eos(row[width:].tolist(), eos_ids, pad_id, keep_eos) for row in gen[b * n:(b + 1) * n]]
            if on_batch is not None:
                on_batch(idx, [out[i] for i in idx])
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return out


def _until_eos(ids: list[int], eos_ids: list[int], pad_id: int, keep_eos: bool = False) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k + keep_eos]
    while ids and ids[-1] == pad_id:  # rows that ran out of tokens are right-padded by generate
        ids = ids[:-1]
    return ids


def eval_samples(model, tokenizer, eval_set, n: int, max_new_tokens: int, synced: bool = False) -> list[dict]:
    """Greedy answers of `model` to the last trained turn of the first `n` tokenised eval examples
    (student view): [{prompt, reference, generation}] as text."""
    prompts, refs = [], []
    for row in eval_set.select(range(min(n, len(eval_set)))):
        start, length = row["student_starts"][-1], row["target_lens"][-1]
        prompts.append(list(row["student_ids"][:start]))
        refs.append(list(row["student_ids"][start:start + length]))
    outs = generate_ids(model, prompts, tokenizer.pad_token_id, stop_ids(model, tokenizer), max_new_tokens,
                        batch_size=max(1, len(prompts)), synced=synced)
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    return [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": text(r), "generation": text(o[0])}
            for p, r, o in zip(prompts, refs, outs)]
