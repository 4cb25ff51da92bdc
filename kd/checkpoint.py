"""Checkpoints that are atomic, verified and pickle-free, and the final HF export.

Layout under <output_dir>/checkpoints/:
    step_00000050/
        model.safetensors       the Distiller's (student's) weights        } single process / DDP
        optimizer.safetensors   optimizer tensors; its structure as JSON    } (rank 0 writes)
        engine/                 DeepSpeed's own files (per-rank partitions) under DeepSpeed
        rng_00000.safetensors   each rank's RNG states (torch tensors; python/numpy as JSON)
        trainer_state.json      step, world size, schedule length, the resolved config
        checksums.json          size and XXH3-128 hash of every other file (written last)
    latest                      text file naming the newest complete checkpoint directory

A checkpoint is written to a hidden `.step_N.partial/` directory and renamed into place only after
every rank has finished writing and the checksums are recorded; `latest` is then replaced
atomically. A kill at any moment leaves the previous checkpoint intact.

Resume verifies a checkpoint before loading anything: every file of checksums.json present, with
its size and hash. A damaged or incomplete one is reported in one line and the newest older one
that verifies is used. Nothing kd writes is a pickle, and nothing is unpickled on resume, except
inside DeepSpeed's own engine files, which are loaded with torch's `weights_only=True` unpickler
(tensors and plain containers only) after their checksums matched.

The LR schedule is not stored: it is a pure function of (config, step, schedule length), rebuilt
on resume, so a changed `optim.lr` really takes effect when the config change is allowed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from kd import lora
from kd.distributed import first_failure, is_deepspeed
from kd.errors import KDError
from kd.integrity import digests, file_digest, files_under, fsync_dir, problems, summary, write_atomic, write_failure

STATE_FILE = "trainer_state.json"
CHECKSUMS = "checksums.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"


class CheckpointError(KDError):
    """A checkpoint that cannot be written or used (disk full, damaged, none usable)."""


def _hash_share(root: Path, names: list[str]) -> dict[str, dict]:
    return digests(root, names)


def _gather(accelerator, obj):
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def verify(accelerator, path: Path) -> str | None:
    """Collective. None if every file of the checkpoint matches checksums.json, else what is
    wrong (one line). Ranks check a share each and agree on the answer."""
    problem = None
    try:
        record = json.loads((path / CHECKSUMS).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        problem = f"no readable {CHECKSUMS} ({type(e).__name__})"
        record = {}
    names = sorted(record)
    bad = problems(path, record, names[accelerator.process_index::accelerator.num_processes])
    found = [b for share in _gather(accelerator, bad) for b in share]
    if problem is None and found:
        problem = summary(found)
    return problem


# --------------------------------------------------------------------------- state pieces


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, cached])}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    """torch optimizer state_dict -> flat tensors + JSON of everything else (no pickle)."""
    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value.contiguous()
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, json.dumps({"param_groups": state_dict["param_groups"], "scalars": scalars})


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], structure: str) -> dict:
    meta = json.loads(structure)
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _engine(accelerator, model):
    return model if is_deepspeed(accelerator) else None


def _partial(module) -> bool:
    """Does the module hold frozen parameters (a LoRA student's base weights)? Those come from the
    model's own files on every start, so checkpoints carry only what trains."""
    return any(not p.requires_grad for p in module.parameters())


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- save


def save(accelerator, model, optimizer, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """Collective: every rank calls it. -> the final checkpoint directory. A write that fails
    (e.g. a full disk) on any rank removes the partial directory on all and raises
    CheckpointError naming the path and the free space; the previous checkpoint stays `latest`."""
    from safetensors.torch import save_file, save_model

    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    rank = accelerator.process_index
    failure = ""
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:  # noqa: BLE001 (any write failure becomes one line on every rank)
            failure = write_failure(e, root)
    failure = first_failure(accelerator, failure)
    if not failure:
        try:
            engine = _engine(accelerator, model)
            partial = _partial(accelerator.unwrap_model(model))
            if engine is not None:  # collective: every rank writes its partitions
                engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False,
                                       exclude_frozen_parameters=partial)
            elif accelerator.is_main_process:
                if partial:  # a LoRA student: the adapters (and modules trained in full) only
                    save_file(_trainable(accelerator.unwrap_model(model)), str(tmp / MODEL_FILE))
                else:
                    save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
                tensors, structure = _optimizer_to_tensors(optimizer.state_dict())
                save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"structure": structure})
            tensors, meta = _rng_state()
            save_file(tensors, str(tmp / f"rng_{rank:05d}.safetensors"), metadata=meta)
        except Exception as e:  # noqa: BLE001
            failure = write_failure(e, tmp)
    failure = first_failure(accelerator, failure)
    if not failure:
        # every rank has written: hash in parallel (each rank a share of the files), rank 0 records
        names = files_under(tmp, skip=(CHECKSUMS,)) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            names = broadcast_object_list([names])[0]
        shares = _gather(accelerator, _hash_share(tmp, names[rank::accelerator.num_processes]))
        if accelerator.is_main_process:
            try:
                for name in names:
                    with open(tmp / name, "rb+") as fh:
                        os.fsync(fh.fileno())
                write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
                record = {k: v for share in shares for k, v in share.items()}
                record[STATE_FILE] = {"size": (tmp / STATE_FILE).stat().st_size,
                                      "xxh3_128": file_digest(tmp / STATE_FILE)}
                write_atomic(tmp / CHECKSUMS, json.dumps({"files": record}, indent=1, sort_keys=True))
                if final.exists():  # re-saving a step (e.g. end of a resumed run) replaces it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(root)
                write_atomic(root / "latest", final.name)
            except Exception as e:  # noqa: BLE001
                failure = write_failure(e, tmp)
        failure = first_failure(accelerator, failure)
    if failure:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise CheckpointError(f"checkpoint at step {step} not saved: {failure}; the previous checkpoint is kept")
    if accelerator.is_main_process:
        for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------- resume


def candidates(output_dir: str) -> list[Path]:
    """Checkpoint directories, the one `latest` names first, then the others newest first."""
    root = Path(output_dir) / "checkpoints"
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        found = [named] + [p for p in found if p != named]
    return found


def find(accelerator, output_dir: str, resume: str, say=print) -> tuple[Path, dict] | None:
    """Collective. `resume` is latest | off | a checkpoint directory. -> (verified directory, its
    trainer state) or None to start fresh. With `latest`, a damaged or incomplete checkpoint is
    reported and the newest older one that verifies is used; none that verifies is an error."""
    if resume in ("off", "none", "false", "False", ""):
        return None
    if resume == "latest":
        paths = candidates(output_dir)
        if not paths:
            return None
    else:
        paths = [Path(resume)]
    rejected = []
    for path in paths:
        problem = verify(accelerator, path)
        if problem is None:
            try:
                state = json.loads((path / STATE_FILE).read_text())
            except (OSError, ValueError) as e:
                problem = f"{STATE_FILE} unreadable ({type(e).__name__})"
            else:
                if rejected:
                    say(f"resuming from {path.name} instead ({len(rejected)} newer checkpoint(s) rejected)")
                return path, state
        say(f"checkpoint {path} is damaged or incomplete: {problem}")
        rejected.append(path)
    where = "train.resume" if resume != "latest" else f"{Path(output_dir) / 'checkpoints'}"
    raise CheckpointError(f"{where}: no checkpoint verifies ({len(rejected)} checked); start afresh with "
                          f"train.resume=off or another train.output_dir")


def load(accelerator, model, optimizer, path: Path, old_world: int) -> None:
    """Load a verified checkpoint into the prepared model and optimizer and restore this rank's
    RNG states (a rank beyond the recorded world size takes rank % old_world's). A file that
    matches its checksum but is not what it should be (not safetensors, tensors of another model)
    is a CheckpointError naming it."""
    engine = _engine(accelerator, model)
    if engine is not None:
        with _weights_only_engine_loads(engine):
            loaded, _ = engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False,
                                               load_module_strict=not _partial(accelerator.unwrap_model(model)))
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load its engine state")
    else:
        device = accelerator.device
        load_weights(accelerator.unwrap_model(model), path, device)
        tensors, meta = read_tensors(path / OPTIMIZER_FILE, device)
        try:
            optimizer.load_state_dict(_optimizer_from_tensors(tensors, meta["structure"]))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit this optimizer ({_first_line(e)})") from None
    rng = path / f"rng_{accelerator.process_index % max(old_world, 1):05d}.safetensors"
    tensors, meta = read_tensors(rng)
    try:
        _set_rng_state(tensors, meta)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{rng}: not a kd RNG state ({type(e).__name__})") from None


def _device_name(device) -> str:
    """safetensors takes 'cpu' or 'cuda:N'; a CPU rank's torch device prints as 'cpu:0' under DDP."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def read_tensors(path: Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata) of a safetensors file, or CheckpointError naming it (one line)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=_device_name(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types, OSError, ...)
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if isinstance(e, RuntimeError) and len(lines) > 1 else (lines or [type(e).__name__])[0])[:160]


def load_weights(module, path: Path, device, prefix: str = "") -> None:
    """A single-process/DDP checkpoint's model weights into `module`: the Distiller that saved
    them, or (prefix="student.") the student alone. A LoRA student's checkpoint holds its trainable
    parameters only; the frozen base weights are the module's own."""
    from safetensors.torch import load_model

    if prefix:  # the saved names are the Distiller's: give the module the same place in a holder
        holder = torch.nn.Module()
        holder.add_module(prefix.rstrip("."), module)
        module = holder
    file = path / MODEL_FILE
    if _partial(module):
        found, _ = read_tensors(file, device)
        try:
            _, unexpected = module.load_state_dict(found, strict=False)
        except RuntimeError as e:  # shapes that do not fit
            raise CheckpointError(f"{file} does not fit this model ({_first_line(e)})") from None
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        missing, unexpected = trainable - found.keys(), set(unexpected)
    else:
        try:  # load_model restores the tensors save_model wrote once for several (tied) names
            missing, unexpected = load_model(module, str(file), strict=False, device=_device_name(device))
        except Exception as e:  # noqa: BLE001 (not safetensors, or shapes that do not fit)
            raise CheckpointError(f"{file}: cannot be loaded into this model ({_first_line(e)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


class _weights_only_engine_loads:
    """DeepSpeed's checkpoint engine unpickles with weights_only=False; swap in one that loads
    with torch's restricted unpickler (tensors, containers, a few torch/DeepSpeed value types)."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.saved = self.engine.checkpoint_engine
        base = self.saved

        class WeightsOnly(type(base)):
            def load(self, path, map_location=None):
                return _safe_torch_load(path, map_location)

        self.engine.checkpoint_engine = WeightsOnly.__new__(WeightsOnly)
        self.engine.checkpoint_engine.__dict__.update(base.__dict__)
        return self

    def __exit__(self, *exc):
        self.engine.checkpoint_engine = self.saved


def _safe_torch_load(path, map_location=None):
    allowed = []
    try:  # value types DeepSpeed writes into its state dicts; none of them runs code on load
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # an unexpected type is refused, never executed
            raise CheckpointError(f"{path}: refused to unpickle ({str(e).splitlines()[0][:200]})") from None


# --------------------------------------------------------------------------- export


def exported(cfg) -> bool:
    """Whether <output_dir>/student holds an export (written whole by a rename, so present means complete)."""
    out = Path(cfg.train.output_dir) / "student"
    return (out / "config.json").is_file() or (out / "adapter_config.json").is_file()


def export(accelerator, distiller, tokenizer, output_dir: str, mode: str = "full") -> Path:
    """The student inside the prepared Distiller -> save_pretrained + tokenizer in
    <output_dir>/student, atomically. Collective (gathers sharded weights where needed).
    A LoRA student is merged into full weights (mode full) or written as its peft adapter (mode
    adapter). Refuses (CheckpointError) to write a student with a non-finite weight."""
    out = Path(output_dir) / "student"
    tmp = Path(output_dir) / ".student.partial"
    full = accelerator.get_state_dict(distiller)
    bad = ""
    if accelerator.is_main_process:
        prefix = "student."
        state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), "")
    bad = first_failure(accelerator, bad)
    if bad:
        raise CheckpointError(f"not exporting the student: tensor {bad!r} holds non-finite values")
    failure = ""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            student = accelerator.unwrap_model(distiller).student
            if lora.is_adapted(student) and mode == "adapter":
                student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            elif lora.is_adapted(student):
                # the merge adds into the base weights: on copies, never into the live (ungathered) ones
                state_dict = {k: v.detach().clone() if ".base_layer." in k else v for k, v in state_dict.items()}
                lora.merged(student, state_dict).save_pretrained(tmp, safe_serialization=True)
            else:
                if getattr(student.config, "tie_word_embeddings", False):
                    # a gathered (ZeRO) state dict holds tied weights as separate copies: keep the source only
                    for key in getattr(student, "_tied_weights_keys", None) or {}:
                        state_dict.pop(key, None)
                student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except Exception as e:  # noqa: BLE001 (a full disk, a read-only directory: one line, nothing left)
            shutil.rmtree(tmp, ignore_errors=True)
            failure = write_failure(e, tmp)
    failure = first_failure(accelerator, failure)
    if failure:
        raise CheckpointError(f"student not exported: {failure}; the last checkpoint is kept (rerun to export "
                              f"from it)")
    accelerator.wait_for_everyone()
    return out
