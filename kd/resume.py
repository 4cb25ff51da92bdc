"""What a resumed run may change: the recorded config against this run's, in one decision.

A checkpoint records the resolved config, the world size and the schedule length. A change to
anything that alters the trajectory is refused (one line: every changed key, old -> new) unless
`train.resume_changes=allow`, which makes each change take effect and logs it. `train.max_steps`
(or `train.epochs`) may grow without that: the LR schedule keeps its recorded length, so past the old end the run
continues at lr * min_lr_ratio; with `allow` the cosine is stretched to the new length instead.
"""

from __future__ import annotations

from kd.config import Config, added_at_default, flat_dict, trajectory_changes
from kd.errors import ConfigError


def recorded_state(cfg: Config, step: int, world: int, total_steps: int, schedule_steps: int, skipped: int) -> dict:
    """What each checkpoint's trainer_state.json holds."""
    return {"step": step, "world_size": world, "total_steps": total_steps, "schedule_steps": schedule_steps,
            "skipped_steps": skipped, "config": flat_dict(cfg)}


LENGTH_KEYS = ("train.max_steps", "train.epochs")


def schedule_after_resume(cfg: Config, state: dict, world: int, total_steps: int, say=print) -> int:
    """Check the resume against the record; -> the LR schedule length to use from here on."""
    old = {**state.get("config", {}), "world_size": state.get("world_size", world)}
    new = {**flat_dict(cfg), "world_size": world}
    changes = trajectory_changes(old, new)
    fresh = added_at_default(old, new)
    if fresh:
        say(f"the checkpoint predates {', '.join(fresh)}: {'they take' if len(fresh) > 1 else 'it takes'} "
            f"the default")
    recorded_total = int(state.get("total_steps", old.get("train.max_steps") or total_steps))
    recorded_schedule = int(state.get("schedule_steps", recorded_total))
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if cfg.train.resume_changes == "allow":
        if changes:
            say(f"resuming with changed settings, each taking effect from step {state['step']}: {shown}")
        return total_steps
    others = [c for c in changes if c[0] not in LENGTH_KEYS]
    if others or total_steps < recorded_total:
        raise ConfigError(f"the checkpoint at step {state['step']} was made with other settings ({shown}); "
                          f"resume with the recorded values, or set train.resume_changes=allow to apply them")
    if total_steps > recorded_total and recorded_schedule < total_steps:
        say(f"the run grows from {recorded_total} to {total_steps} steps: the LR schedule keeps its recorded "
            f"length ({recorded_schedule} steps), so steps after {recorded_schedule} run at lr x "
            f"{cfg.optim.min_lr_ratio} (train.resume_changes=allow stretches the cosine instead)")
    return recorded_schedule
