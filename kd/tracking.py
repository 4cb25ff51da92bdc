"""Every rank-0 side effect behind one object: console lines, the progress bar, metrics.jsonl,
samples.jsonl and the experiment tracker (W&B through accelerate's trackers, or none). Other ranks get no-ops, so the
training loop has no `if main_process:` branches."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from kd.config import Config, flat_dict


class Tracker:
    def __init__(self, accelerator, cfg: Config, objective: str = ""):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.out = Path(cfg.train.output_dir)
        self.cfg = cfg
        self.bar = None
        self._jsonl = None
        if self.main and cfg.log.tracker == "wandb":
            init = {"dir": str(self.out), "id": self._run_id(), "resume": "allow"}
            if cfg.log.run_name:
                init["name"] = cfg.log.run_name
            if cfg.log.entity:
                init["entity"] = cfg.log.entity
            accelerator.init_trackers(cfg.log.project, config={**flat_dict(cfg), "objective": objective}, init_kwargs={"wandb": init})

    def _run_id(self) -> str:
        """One W&B run per output_dir, so a resumed run continues the same charts; under a sweep
        agent, the run the sweep controller assigned."""
        if os.environ.get("WANDB_RUN_ID"):
            return os.environ["WANDB_RUN_ID"]
        path = self.out / "wandb_run_id"
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id)
        return run_id

    def print(self, *args) -> None:
        if not self.main:
            return
        msg = " ".join(str(a) for a in args)
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def start(self, first_step: int, total: int) -> None:
        """Open metrics.jsonl (dropping rows past `first_step`, which a resumed run rewrites) and the bar."""
        if not self.main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.out / name
            if path.exists():
                rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= first_step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(r + "\n" for r in rows))
                os.replace(tmp, path)
        self._jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if self.cfg.log.progress_bar:
            self.bar = tqdm(total=total, initial=first_step, desc="kd", dynamic_ncols=True)

    def log(self, row: dict, step: int) -> None:
        if not self.main:
            return
        self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.accelerator.log(row, step=step)
        if self.bar is not None and "train/loss" in row:
            # refreshed now, so the bar shows the loss of the step it just finished
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=True)
        if "eval/ce" in row:  # one compact line per evaluation; the full row is in metrics.jsonl / W&B
            self.print(f"step {step}: eval ce {row['eval/ce']:.4f}  kd {row['eval/kd']:.4f}  "
                       f"top-1 agreement {row['eval/top1_agreement']:.1%}  ({row['eval/tokens']:.0f} tokens)")

    def log_samples(self, samples: list[dict], step: int) -> None:
        """Sample generations of one evaluation: appended to samples.jsonl, and a W&B Table."""
        if not self.main or not samples:
            return
        with open(self.out / "samples.jsonl", "a") as fh:
            for i, row in enumerate(samples):
                fh.write(json.dumps({"step": step, "example": i, **row}, ensure_ascii=False) + "\n")
        if self.cfg.log.tracker == "wandb":
            import wandb

            table = wandb.Table(columns=["step", "example", "prompt", "reference", "generation"],
                                data=[[step, i, r["prompt"], r["reference"], r["generation"]] for i, r in enumerate(samples)])
            self.accelerator.log({"eval/samples": table}, step=step)

    def status(self, text: str) -> None:
        """What the step is doing now, on the bar (a long on-policy generation is not a frozen bar)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._jsonl is not None:
            self._jsonl.close()
        self.accelerator.end_training()
