"""python -m kd.cache --config <yaml> teacher.cache=<dir> [--k 64] [overrides]"""

from __future__ import annotations

import argparse

from kd.cache.build import build_cache
from kd.cache.store import CacheError
from kd.cli import one_line_errors, parse_args, quiet_libraries


def main(argv: list[str] | None = None) -> None:
    """python -m kd.cache --config <yaml> teacher.cache=<dir> [--k 64] [overrides]"""
    ap = argparse.ArgumentParser(prog="kd.cache", allow_abbrev=False,
                                 description="Run the teacher once and store its top-k logits (see kd/cache/).")
    ap.add_argument("--k", type=int, default=64, help="top-k logits kept per response token (default 64)")
    ap.add_argument("--tail-temperatures", default="1,2,4,8",
                    help="temperatures whose exact tail mass is stored (1 is always included; default 1,2,4,8)")
    ap.add_argument("--shard-examples", type=int, default=256, help="examples per shard file (default 256)")
    ap.add_argument("--batch-size", type=int, default=None, help="teacher micro-batch (default train.micro_batch_size)")
    ap.add_argument("--device-map", default=None,
                    help="from_pretrained device_map, e.g. auto: one process spreads the teacher over its GPUs")
    ap.add_argument("--out", default=None, help="cache directory (default: teacher.cache)")
    args, rest = ap.parse_known_args(argv)
    with one_line_errors():
        from kd.config import load_config

        path, overrides = parse_args(rest)
        if args.out:
            overrides = [*overrides, f"teacher.cache={args.out}"]
        quiet_libraries()
        try:
            temps = [float(t) for t in args.tail_temperatures.split(",") if t.strip()]
        except ValueError:
            raise CacheError(f"--tail-temperatures takes numbers, not {args.tail_temperatures!r}") from None
        build_cache(load_config(path, overrides), k=args.k, tail_temperatures=temps, shard_examples=args.shard_examples,
                    batch_size=args.batch_size, device_map=args.device_map)


if __name__ == "__main__":
    main()
