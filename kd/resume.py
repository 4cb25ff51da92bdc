"""What a resumed run may change: the recorded config against this run's, in one decision.

A checkpoint records the resolved config, the world size and the schedule length. A change to
anything that alters the trajectory is refused (one line: every changed key, old -> new) unless
`train.resume_changes=allow`, which makes each change take effect and logs it. `train.max_steps`
may grow without that: the LR schedule keeps its recorded length, so past the old end the run
continues at lr * min_lr_ratio; with `allow` the cosine is stretched to the new length instead.
"""

from __future__ import annotations

from kd.config import Config, flat_dict, trajectory_changes
from kd.errors import ConfigError


def recorded_state(cfg: Config, step: int, world: int, schedule_steps: int, skipped: int) -> dict:
    """What each checkpoint's trainer_state.json holds."""
    return {"step": step, "world_size": world, "schedule_steps": schedule_steps, "skipped_steps": skipped,
            "config": flat_dict(cfg)}


def schedule_after_resume(cfg: Config, state: dict, world: int, say=print) -> int:
    """Check the resume against the record; -> the LR schedule length to use from here on."""
    old = {**state.get("config", {}), "world_size": state.get("world_size", world)}
    new = {**flat_dict(cfg), "world_size": world}
    changes = trajectory_changes(old, new)
    recorded = int(state.get("schedule_steps", old.get("train.max_steps", cfg.train.max_steps)))
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if cfg.train.resume_changes == "allow":
        if changes:
            say(f"resuming with changed settings, each taking effect from step {state['step']}: {shown}")
        return cfg.train.max_steps
    others = [c for c in changes if c[0] != "train.max_steps"]
    grown = cfg.train.max_steps > int(old.get("train.max_steps", cfg.train.max_steps))
    if others or (changes and not grown):
        raise ConfigError(f"the checkpoint at step {state['step']} was made with other settings ({shown}); "
                          f"resume with the recorded values, or set train.resume_changes=allow to apply them")
    if grown and recorded < cfg.train.max_steps:
        say(f"train.max_steps {old['train.max_steps']} -> {cfg.train.max_steps}: the LR schedule keeps its recorded "
            f"length ({recorded} steps), so steps after {recorded} run at lr x {cfg.optim.min_lr_ratio} "
            f"(train.resume_changes=allow stretches the cosine instead)")
    return recorded
