"""python -m kd.cache --config <yaml> teacher.cache=<dir> [--k 64 | --format sampled --draws 32] [overrides]"""

from __future__ import annotations

import argparse

from kd.cache.build import build_cache
from kd.cache.store import CacheError
from kd.cli import one_line_errors, parse_args, quiet_libraries


def main(argv: list[str] | None = None) -> None:
    """python -m kd.cache --config <yaml> teacher.cache=<dir> [--k 64 | --format sampled --draws 32] [overrides]"""
    ap = argparse.ArgumentParser(prog="kd.cache", allow_abbrev=False,
                                 description="Run the teacher once and store its top-k logits or samples from it "
                                             "(see kd/cache/).")
    ap.add_argument("--format", default="topk", choices=("topk", "sampled"),
                    help="topk: the k largest logits + tail mass (default); sampled: N draws from the teacher, "
                         "unbiased for forward KL at every stored temperature (kd/loss/sampled.py)")
    ap.add_argument("--k", type=int, default=64, help="topk: logits kept per response token (default 64)")
    ap.add_argument("--draws", type=int, default=32, help="sampled: draws per response token (default 32)")
    ap.add_argument("--proposal-temperature", type=float, default=1.0,
                    help="sampled: the teacher temperature drawn from (default 1)")
    ap.add_argument("--sample-seed", type=int, default=0,
                    help="sampled: seed of the draws (with each example's id; default 0)")
    ap.add_argument("--tail-temperatures", default=None,
                    help="temperatures the cache serves exactly (topk: tail mass stored, 1 always included, default "
                         "1,2,4,8; sampled: one number per token each, none above the proposal's, default the "
                         "proposal's and 1 if lower)")
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
            temps = None if args.tail_temperatures is None else \
                [float(t) for t in args.tail_temperatures.split(",") if t.strip()]
        except ValueError:
            raise CacheError(f"--tail-temperatures takes numbers, not {args.tail_temperatures!r}") from None
        build_cache(load_config(path, overrides), k=args.k, tail_temperatures=temps, shard_examples=args.shard_examples,
                    batch_size=args.batch_size, device_map=args.device_map, cache_format=args.format,
                    draws=args.draws, proposal_temperature=args.proposal_temperature, sample_seed=args.sample_seed)


if __name__ == "__main__":
    main()
