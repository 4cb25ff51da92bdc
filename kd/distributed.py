"""The Accelerator, the DeepSpeed plumbing (student under ZeRO-2/3, teacher under ZeRO-3 inference),
and the few collectives the loop needs.

The student's DeepSpeed config comes from the launch (`accelerate launch --config_file
launch/<...>.yaml`); kd fills its "auto" batch/accumulation/clipping values from the kd config and
refuses explicit values that disagree. The teacher never goes through `accelerator.prepare`: it is
its own ZeRO-3 inference engine (`deepspeed.initialize` without optimizer), built from the kd
config, so it is partitioned across ranks whatever stage the student uses, and it is not part of
its checkpoints.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from kd.config import Config
from kd.errors import ConfigError


def _launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config) -> Accelerator:
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo: without it a multi-process CPU launch (DDP or DeepSpeed) does not form one group
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        # cpu=True makes a CPU multi-process launch use DDP over gloo (else each rank trains alone);
        # DeepSpeed on CPU must not get it (it would silently drop DeepSpeed)
        cpu=not torch.cuda.is_available() and not _launched_with_deepspeed(),
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="wandb" if cfg.log.tracker == "wandb" else None,
        project_dir=cfg.train.output_dir,
        kwargs_handlers=handlers,
        # the loop owns the schedule: one scheduler step per optimizer step
        step_scheduler_with_optimizer=False,
    )
    if is_deepspeed(accelerator):
        _fill_student_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fill_student_config(ds: dict, cfg: Config, world: int) -> None:
    """kd's config is the source of truth; the launch JSON may say "auto" or agree."""
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world,
        "gradient_clipping": float(cfg.optim.max_grad_norm),
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have != "auto" and float(have) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={have} but the kd config implies {value}; "
                              f"set it to \"auto\" in the JSON")
        ds[key] = value
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # the final export gathers the student into one HF checkpoint
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def teacher_zero3_config(accelerator: Accelerator, cfg: Config, hidden_size: int) -> dict:
    """ZeRO-3 inference config for the teacher: parameters partitioned, no optimizer."""
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "reduce_bucket_size": hidden_size * hidden_size,
    }
    if cfg.teacher.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    mb = cfg.train.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "train_batch_size": mb * accelerator.num_processes,
        "zero_optimization": zero,
        "bf16": {"enabled": accelerator.mixed_precision == "bf16"},
        "fp16": {"enabled": accelerator.mixed_precision == "fp16"},
        "steps_per_print": 10**9,
    }


@contextlib.contextmanager
def zero3_loading(accelerator: Accelerator, ds_config: dict | None):
    """Inside, `from_pretrained` partitions weights while loading (no rank holds the full teacher)."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # back to the student's config


def shard_teacher(teacher, ds_config: dict | None, device):
    """-> (teacher module ready for forwards, engine or None). The engine must be kept alive."""
    if ds_config is None:
        return teacher.to(device), None
    import deepspeed

    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.module.eval()
    return engine.module, engine


def gathered(*params):
    """Full copies of ZeRO-3-partitioned parameters for use outside their module's forward
    (the lm_head weights the loss projects with); a no-op for ordinary parameters."""
    zero = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=None)


def local_numel(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model): a partitioned model holds ~1/world."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held, full


def global_sum(accelerator: Accelerator, values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum across ranks in one collective (float64 so token counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t


def reset_peak_memory() -> None:
    """Start the peak reading afresh (what came before, e.g. tokenising into the data store in
    this process, is not the training footprint kd.plan estimates)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass


def memory_gib() -> tuple[float, float]:
    """(current, peak) memory of this process in GiB: the CUDA allocator on GPU, RSS on CPU
    (peak since the last reset_peak_memory)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmRSS"].split()[0]) / 2**20, int(status["VmHWM"].split()[0]) / 2**20


def first_failure(accelerator: Accelerator, failure: str) -> str:
    """Every rank learns the first rank's failure message ("" if none), so a failure on one rank
    ends all of them instead of leaving the others waiting in a collective."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    found = [f for f in gather_object([failure]) if f]
    return found[0] if found else ""
