"""Write the demo splits data/demo/train.jsonl and data/demo/eval.jsonl (deterministic).

    python scripts/make_demo_data.py [OUT_DIR]

The eval set is drawn first with its own seed; train is drawn with another seed and skips every
eval prompt, so the splits are disjoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.demo.tasks import make_splits  # noqa: E402

N_TRAIN, N_EVAL = 2000, 200
TRAIN_SEED, EVAL_SEED = 1234, 5678


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, fixed key order, LF endings, so reruns are byte-identical."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Generate both splits into OUT_DIR (default data/demo)."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else ROOT / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    train, eval_set = make_splits(N_TRAIN, N_EVAL, train_seed=TRAIN_SEED, eval_seed=EVAL_SEED)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", eval_set)
    print(f"wrote {len(train)} train and {len(eval_set)} eval records to {out}")


if __name__ == "__main__":
    main()
