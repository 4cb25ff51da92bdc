"""Distil a frozen teacher into a student: the whole training loop, top to bottom.

    accelerate launch kd/train.py --config configs/demo.yaml [key=value | --key=value ...]
    python -m kd.train --config configs/demo.yaml train.max_steps=10
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: make `kd` importable, not kd/*.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import functools
import math
import time

import torch
from accelerate.utils import set_seed

from kd import checkpoint, lora, rundir, samples
from kd.cache.store import TeacherCache
from kd.cache.teacher import CachedDistiller, cached_eval_sums
from kd.config import Config, ConfigError, load_config, to_yaml
from kd.data import MicroBatchSampler, build_datasets, eval_batches, example_lengths, train_loader
from kd.distributed import (first_failure, global_sum, is_deepspeed, local_numel, make_accelerator,
                            memory_gib, reset_peak_memory, shard_teacher, teacher_zero3_config, zero3_loading)
from kd.forward import Distiller, eval_sums, head, packing_refusal, teacher_forward
from kd.guard import NonFiniteError
from kd.loss import LossSpec
from kd.models import load_student, load_teacher, load_tokenizers, teacher_hidden_size
from kd.objective import objective
from kd.onpolicy import CutWatch, GenStats, OnPolicy
from kd.preempt import StopRequest
from kd.resume import recorded_state, schedule_after_resume
from kd.step import Step
from kd.tracking import Tracker


def adamw_kernel(implementation: str, device_type: str) -> dict:
    """AdamW's keyword for the chosen kernel. The fused kernel updates every parameter of a group
    in one call (2.4-2.9x faster than the per-parameter loop on CPU here); auto takes it wherever
    torch has one for the device."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if implementation == "auto":
        implementation = "fused" if device_type in _get_fused_kernels_supported_devices() else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def make_optimizer(model: torch.nn.Module, cfg: Config, schedule_steps: int | None = None,
                   device_type: str | None = None):
    """AdamW without decay on biases and norm weights; linear warmup then cosine to min_lr_ratio
    over `schedule_steps` (default train.max_steps). The schedule is a pure function of the step."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = lambda p: len(getattr(p, "ds_shape", p.shape)) >= 2  # noqa: E731 (ZeRO-3 params are flat)
    groups = [
        {"params": [p for p in params if matrix(p)], "weight_decay": o.weight_decay, "kd_decay": True},
        {"params": [p for p in params if not matrix(p)], "weight_decay": 0.0, "kd_decay": False},
    ]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the scheduler must not see them
    device_type = device_type or (params[0].device.type if params else "cpu")  # where it will step
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  **adamw_kernel(o.implementation, device_type))
    total = schedule_steps or cfg.train.max_steps

    def lr_factor(step: int) -> float:
        if step >= total:  # past the schedule (a run grown on resume): the floor, even mid-warmup
            return o.min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def restore_schedule(optimizer, scheduler, cfg: Config, step: int, device_type: str) -> None:
    """After loading optimizer state: this config's hyperparameters and the schedule at `step`
    (the loaded param groups carry the recorded ones)."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [o.lr * f(step) for f in scheduler.lr_lambdas]
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group.update(lr=lr, betas=(o.beta1, o.beta2), eps=o.eps,
                     weight_decay=o.weight_decay if group.get("kd_decay") else 0.0)
        if "fused" in group:  # the kernel too (a torch optimizer; DeepSpeed's own keeps its choice)
            group.update({"fused": None, "foreach": None, **adamw_kernel(o.implementation, device_type)})


def evaluate(accelerator, student, teacher_sums, dataset, cfg: Config, pad_id: int) -> dict[str, float]:
    """Held-out student CE, divergence to the teacher and top-1 agreement, per response token.
    `teacher_sums(student, batch)` is eval_sums with the live teacher, or the cached variant.
    Non-finite sums raise NonFiniteError: no metric is ever computed from them."""
    keys = ("ce", "kd", "loss", "top1_agreement", "tokens")
    totals = torch.zeros(len(keys), dtype=torch.float64, device=accelerator.device)
    student.eval()
    batches = eval_batches(dataset, cfg.train.micro_batch_size, accelerator.num_processes,
                           accelerator.process_index, pad_id, cfg.train.eval_max_batches)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            sums = teacher_sums(student=student, batch=batch)
        totals += torch.stack([sums[k].double() for k in keys])
    student.train()
    totals = global_sum(accelerator, totals)
    if not torch.isfinite(totals).all():
        bad = [k for k, v in zip(keys, totals.tolist()) if not math.isfinite(v)]
        raise NonFiniteError(f"eval metrics are non-finite ({', '.join(bad)})")
    n = max(totals[-1].item(), 1.0)
    row = {f"eval/{k}": totals[i].item() / n for i, k in enumerate(keys[:-1])}
    row["eval/ppl"] = math.exp(min(row["eval/ce"], 50.0))
    row["eval/tokens"] = totals[-1].item()
    return row


def onpolicy_row(accelerator, on: list[bool], n_on: float, kd_on: float, gen_totals: list[float], gen: GenStats,
                 step_seconds: float) -> dict:
    """train/onpolicy_* and train/gen_* of one step; gen_totals: the step's all-reduced
    (sequences, tokens, stopped by length, seconds)."""
    row = {"train/onpolicy_fraction": sum(on) / len(on)}
    sequences, tokens, by_length, seconds = gen_totals
    if sequences:
        world = accelerator.num_processes
        longest = accelerator.gather(torch.tensor([gen.longest], device=accelerator.device)).max().item()
        row.update({"train/onpolicy_kd": kd_on / max(n_on, 1.0), "train/gen_len_mean": tokens / sequences,
                    "train/gen_len_max": longest, "train/gen_stopped_by_length": by_length / sequences,
                    "train/gen_tokens_per_s": tokens / max(seconds / world, 1e-9),
                    "train/gen_time_share": seconds / world / step_seconds})
    return row


def kept_checkpoint(cfg: Config) -> str:
    """What a run that stops on a non-finite value leaves to resume from, in words."""
    kept = checkpoint.candidates(cfg.train.output_dir)
    return f"last good checkpoint {kept[0]}" if kept else "no checkpoint was written"


def open_run_dir(accelerator, cfg: Config) -> rundir.RunLock:
    """Check and lock output_dir (rank 0); every rank learns of a failure."""
    lock, failure, note = rundir.RunLock(cfg.train.output_dir), "", None
    if accelerator.is_main_process:
        try:
            rundir.prepare(cfg.train.output_dir)
            note = lock.acquire()
        except rundir.RunDirError as e:
            failure = str(e)
        except OSError as e:
            failure = f"train.output_dir={cfg.train.output_dir}: {e.strerror}"
    failure = first_failure(accelerator, failure)
    if failure:
        raise rundir.RunDirError(failure)
    if note:
        print(note, flush=True)
    return lock


def features(accelerator, cfg: Config, student, train_stats) -> str:
    """One line: what this run does besides plain off-policy distillation, on or off."""
    world = accelerator.num_processes
    plugin = accelerator.state.deepspeed_plugin
    how = f"DeepSpeed ZeRO-{plugin.zero_stage}, {world} ranks" if plugin else \
        (f"DDP, {world} ranks" if world > 1 else "1 process")
    on = [how, f"{accelerator.device.type}",
          f"packing on (rows of <= {cfg.data.max_length} tokens, examples kept apart: checked)" if cfg.data.packing
          else "packing off",
          {"off": "store off", "read": "store hit", "built": "store built"}[train_stats.store],
          f"LoRA rank {cfg.student.lora.rank}" if lora.is_adapted(student) else "LoRA off",
          f"on-policy {cfg.onpolicy.fraction:.0%} of micro-batches{cfg.onpolicy.schedule()}"
          if cfg.onpolicy.fraction > 0 else "on-policy off",
          "teacher cache" if cfg.teacher.cache else "teacher cache off"]
    return "features: " + ", ".join(on)


def train(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    lock = open_run_dir(accelerator, cfg)
    if cfg.train.on_nonfinite == "skip" and is_deepspeed(accelerator):
        raise ConfigError("train.on_nonfinite=skip is not available under DeepSpeed (its engine steps inside "
                          "backward); use stop")
    world, accum = accelerator.num_processes, cfg.train.grad_accum_steps
    tokenizer = load_tokenizers(cfg, check_teacher=not cfg.teacher.cache)
    vocab, pad_id = len(tokenizer), tokenizer.pad_token_id
    spec = LossSpec.from_config(cfg.loss, vocab)  # one set of loss options for training and eval
    goal = objective(cfg, spec, world)
    tracker = Tracker(accelerator, cfg, goal)
    tracker.print(goal)
    train_set, eval_set, train_stats, eval_stats = build_datasets(cfg.data, tokenizer, cfg.train.seed,
                                                                  log=tracker.print)
    tracker.print(train_stats.summary("train data"))
    if eval_stats is not None:
        tracker.print(eval_stats.summary("eval data"))
    sampler = MicroBatchSampler(len(train_set), cfg.train.micro_batch_size, world, accelerator.process_index,
                                cfg.train.seed, cfg.data.shuffle, accum,
                                lengths=example_lengths(train_set) if cfg.data.group_by_length else None)
    total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * sampler.per_epoch / accum))
    tracker.print(sampler.describe(accum) + (f"; train.epochs={cfg.train.epochs}: {total_steps} optimizer steps"
                                             if cfg.train.epochs else ""))
    # Which checkpoint (verified) and whether its settings may continue, before any model loads.
    resume = checkpoint.find(accelerator, cfg.train.output_dir, cfg.train.resume, say=tracker.print)
    if resume and resume[1]["step"] >= total_steps and (cfg.train.export == "off" or checkpoint.exported(cfg)):
        tracker.print(f"{cfg.train.output_dir}: this run already finished at step {resume[1]['step']}"
                      + (f" (student in {Path(cfg.train.output_dir) / 'student'})" if cfg.train.export != "off" else "")
                      + "; raise train.max_steps or train.epochs to train on, or choose another train.output_dir")
        tracker.finish()
        lock.release()
        return {"step": resume[1]["step"], "finished": True}
    schedule_steps = schedule_after_resume(cfg, resume[1], world, total_steps, tracker.print) if resume \
        else total_steps
    if accelerator.is_main_process:
        (Path(cfg.train.output_dir) / "config.yaml").write_text(f"# {goal}\n" + to_yaml(cfg))

    device_type = accelerator.device.type
    reset_peak_memory()  # the data build (tokenising) is not part of the training footprint
    base_mem = memory_gib()[0]  # before any model: what kd.plan's estimate is compared with
    # Under DeepSpeed the teacher is partitioned while it loads (ZeRO-3 inference), never replicated.
    teacher_ds = teacher_zero3_config(accelerator, cfg, teacher_hidden_size(cfg)) \
        if is_deepspeed(accelerator) and cfg.teacher.zero3 and not cfg.teacher.cache else None
    with zero3_loading(accelerator, teacher_ds):
        teacher = None if cfg.teacher.cache else load_teacher(cfg, vocab, device_type)  # a cache replaces it
    student = load_student(cfg, vocab, device_type)
    if lora.is_adapted(student):
        tracker.print(lora.describe(student))

    cache = TeacherCache.open(cfg, tokenizer, train_set, eval_set) if cfg.teacher.cache else None
    distiller = CachedDistiller(student, spec) if cache else Distiller(student, spec)
    optimizer, scheduler = make_optimizer(distiller, cfg, schedule_steps, device_type)
    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    accelerator.unwrap_model(distiller).register_zero3_head()
    # The teacher's side of the loss comes from the live (sharded) teacher or from the cache.
    if cache is not None:
        tracker.print(cache.describe())
        teacher_head = None
        teacher_outputs = functools.partial(cache.lookup, split="train")
        teacher_sums = functools.partial(cached_eval_sums, cache=cache, spec=spec)
    else:
        teacher, teacher_engine = shard_teacher(teacher, teacher_ds, accelerator.device)  # keep the engine alive
        held, full = local_numel(teacher)
        tracker.print(f"teacher: {'ZeRO-3 partitioned' if teacher_ds else 'replicated'}, rank 0 holds "
                      f"{held:,} of {full:,} parameters ({held / full:.1%})")
        teacher_head = head(teacher)
        teacher_outputs = functools.partial(teacher_forward, teacher)
        teacher_sums = functools.partial(eval_sums, teacher=teacher, spec=spec)
    student = accelerator.unwrap_model(distiller).student
    # onpolicy.fraction > 0: some micro-batches are the student's own answers, graded by the teacher;
    # a ZeRO-3 partitioned student decodes on all ranks together
    onpolicy = OnPolicy(cfg, tokenizer, synced=hasattr(next(student.parameters()), "ds_id")) \
        if cfg.onpolicy.fraction > 0 else None
    if onpolicy is not None:  # collapse guards: turns must end on a stop token; answers cut by the budget
        onpolicy.check_turn_ends(student, [train_set[i] for i in range(min(len(train_set), 1000))])
        cut_watch = CutWatch(cfg.onpolicy)
    if cfg.data.packing:  # packed rows rely on position ids alone to keep examples apart
        for role, model in (("student", student), ("teacher", None if cache else teacher)):
            if model is not None:
                packing_refusal(role, model, vocab)

    step, skipped, skipped_in_row = 0, 0, 0
    if resume is not None:
        path, state = resume
        checkpoint.load(accelerator, distiller, optimizer, path, state.get("world_size", world))
        step, skipped = state["step"], state.get("skipped_steps", 0)
        restore_schedule(optimizer, scheduler, cfg, step, device_type)
        tracker.print(f"resumed from {path} at step {step}")

    def save(at: int) -> Path:
        return checkpoint.save(accelerator, distiller, optimizer, cfg.train.output_dir, at,
                               recorded_state(cfg, at, world, total_steps, schedule_steps, skipped), cfg.train.keep_checkpoints)

    tracker.print(features(accelerator, cfg, student, train_stats))
    tracker.start(step, total_steps)
    stop = StopRequest(cfg.train.output_dir, clear=accelerator.is_main_process, say=tracker.print)
    accelerator.wait_for_everyone()  # the STOP file is cleared before any rank looks for it
    batches = iter(train_loader(train_set, sampler, pad_id, step * accum, total_steps * accum, cfg.data.packing,
                                cfg.data.max_length))
    run_step = Step(accelerator, distiller, teacher_outputs, teacher_head, onpolicy=onpolicy,
                    rows_of=lambda k: [train_set[j] for j in sampler.indices(k)], accum=accum,
                    use_teacher=spec.needs_teacher,  # CE-only training never runs the teacher forward
                    max_grad_norm=cfg.optim.max_grad_norm, status=tracker.status)

    while step < total_steps:
        t0 = time.perf_counter()
        out = run_step(step, [next(batches) for _ in range(accum)], stop.requested)
        if out.stopped:
            save(step)
            tracker.print(f"stop requested ({stop.reason() or 'on another rank'}): checkpoint at "
                          f"step {step} saved; rerun the same command to resume")
            tracker.finish()
            stop.close()
            lock.release()
            return {"step": step, "stopped": True}
        counts, totals, on, gen, grad_norm, bad, n_global = (out.counts, out.totals, out.on, out.gen, out.grad_norm,
                                                              out.bad, out.n_global)
        lr = scheduler.get_last_lr()[0]
        if bad and (cfg.train.on_nonfinite == "stop" or skipped_in_row + 1 >= cfg.train.max_skipped_steps):
            tracker.finish()
            why = "" if cfg.train.on_nonfinite == "stop" else f" ({skipped_in_row + 1} steps in a row)"
            # DeepSpeed's engine has stepped inside backward by the time its gradient norm is known
            taken = "applied in memory only, nothing saved" if grad_norm is not None and is_deepspeed(accelerator) \
                else "no step taken"
            raise NonFiniteError(f"step {step + 1}: {bad} went non-finite{why}; {taken}; {kept_checkpoint(cfg)}")
        if bad:  # skip: this step's data is consumed, weights and optimizer state stay as they are
            skipped, skipped_in_row = skipped + 1, skipped_in_row + 1
            tracker.print(f"step {step + 1}: {bad} went non-finite; step skipped ({skipped_in_row} in a row)")
        else:
            optimizer.step()
            skipped_in_row = 0
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tracker.advance()

        last = step == total_steps
        row = {}
        if step % cfg.log.log_every == 0 or last:
            n_on = counts[3].item()
            n_off = n_global - n_on  # ce and kd are per off-policy token; on-policy kd apart
            dt = time.perf_counter() - t0
            row = {"train/loss": totals[0] / n_global, "train/ce": totals[1] / max(n_off, 1.0),
                   "train/kd": totals[2] / max(n_off, 1.0), "train/lr": lr,
                   "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
                   "train/response_tokens": n_global,
                   "train/tokens_per_s": counts[1].item() / dt, "train/epoch": sampler.epoch_of(step * accum),
                   "train/skipped_steps": skipped,
                   "sys/peak_mem_gib": memory_gib()[1], "sys/base_mem_gib": base_mem}
            if onpolicy is not None:
                row.update(onpolicy_row(accelerator, on, n_on, totals[4], counts[4:].tolist(), gen, dt),
                           **{"train/onpolicy_lambda": cfg.onpolicy.lam(step - 1)})
                if warning := cut_watch.see(step, row):
                    tracker.print(warning)
                if n_off == 0:  # no off-policy token this step: no CE to report
                    del row["train/ce"], row["train/kd"]
            if bad:  # never log non-finite values as if they were metrics
                row = {k: v for k, v in row.items() if not k.startswith(("train/loss", "train/ce", "train/kd",
                                                                         "train/onpolicy_kd", "train/grad_norm"))}
        if eval_set is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
            try:
                row.update(evaluate(accelerator, student, teacher_sums, eval_set, cfg, pad_id))
            except NonFiniteError as e:
                if cfg.train.on_nonfinite == "stop":
                    if row:
                        tracker.log(row, step)  # the training step itself was finite
                    tracker.finish()
                    raise NonFiniteError(f"step {step}: {e}; {kept_checkpoint(cfg)}") from None
                tracker.print(f"step {step}: {e}; not logged")
        if row:
            tracker.log(row, step)
        if cfg.log.samples and "eval/ce" in row:  # every rank decodes (a ZeRO-3 student gathers collectively)
            tracker.log_samples(samples.eval_samples(student, tokenizer, eval_set, cfg.log.samples,
                                                     cfg.log.sample_max_new_tokens, synced=world > 1), step)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or last:
            path = save(step)
            tracker.print(f"step {step}: checkpoint {path}")

    if cfg.train.export != "off":
        path = checkpoint.export(accelerator, distiller, tokenizer, cfg.train.output_dir, cfg.train.export)
        tracker.print(f"student exported to {path}")
    tracker.finish()
    stop.close()
    lock.release()
    return {"step": step, "skipped_steps": skipped}


def main(argv: list[str] | None = None) -> None:
    from kd.cli import one_line_errors, parse_args, quiet_libraries

    with one_line_errors():
        path, overrides = parse_args(argv, "kd.train", __doc__.split("\n")[0])
        quiet_libraries()
        train(load_config(path, overrides))


if __name__ == "__main__":
    main()
