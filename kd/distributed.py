"""The Accelerator and the few collectives the loop needs."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from kd.config import Config


def make_accelerator(cfg: Config) -> Accelerator:
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo: without it a multi-process CPU launch (DDP or DeepSpeed) does not form one group
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        # cpu=True makes a CPU multi-process launch use DDP over gloo (else each rank trains alone);
        # DeepSpeed on CPU must not get it (it would silently drop DeepSpeed)
        cpu=not torch.cuda.is_available() and not deepspeed,
        mixed_precision=mp,
        log_with="wandb" if cfg.log.tracker == "wandb" else None,
        project_dir=cfg.train.output_dir,
        kwargs_handlers=handlers,
        # the loop owns accumulation and the schedule: one scheduler step per optimizer step
        step_scheduler_with_optimizer=False,
    )


def global_sum(accelerator: Accelerator, values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum across ranks in one collective (float64 so token counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t
