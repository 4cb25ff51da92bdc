"""What a resumed run may change: the recorded config against this run's, in one decision.

A checkpoint records the resolved config, the world size and the schedule length. A change to
anything that alters the trajectory is refused (one line: every changed key, old -> new) unless
`train.resume_changes=allow`, which makes each change take effect and logs it. `train.max_steps`
(or `train.epochs`) may grow without that: the LR schedule keeps its recorded length, so past the old end the run
continues at lr * min_lr_ratio; with `allow` the cosine is stretched to the new length instead.
"""

from __future__ import annotations

from typing import Any

from kd.config import Config, flat_dict, flat_dict_defaults
from kd.errors import ConfigError

# Keys that cannot change what a resumed run computes: everything else is part of the trajectory.
RESUME_FREE = ("train.output_dir", "train.eval_every", "train.eval_max_batches", "train.save_every",
               "train.keep_checkpoints", "train.resume", "train.export", "train.resume_changes",
               "train.on_nonfinite", "train.max_skipped_steps", "data.num_proc", "data.store", "teacher.zero3",
               "teacher.offload",
               "log.")


def trajectory_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every changed key that alters the trajectory, from two flat dicts
    (flat_dict of the recorded and of the current config). train.max_steps is included."""
    out, fresh = [], set(added_at_default(old, new))
    for key in sorted(old.keys() | new.keys()):
        if key in fresh or any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE):
            continue
        if old.get(key) != new.get(key):
            out.append((key, old.get(key), new.get(key)))
    return out


def added_at_default(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys a recorded config lacks (it predates them) that this run leaves at their default:
    not a change of trajectory, so an older checkpoint still resumes."""
    defaults = flat_dict_defaults()
    return sorted(k for k in new.keys() - old.keys() if k in defaults and repr(new[k]) == defaults[k])


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
