"""Offline teacher-logit cache: run the teacher once, distil from its stored top-k (or samples) many times.

Build it (every rank writes its own shards; a rerun skips the shards already written):

    python -m kd.cache --config configs/demo.yaml teacher.cache=runs/cache/demo --k 64
    accelerate launch -m kd.cache --config configs/<name>.yaml teacher.cache=<dir> --k 64
    python -m kd.cache --config configs/demo.yaml teacher.cache=runs/cache/sampled --format sampled --draws 32

then train with the same config and `teacher.cache=<dir>`: no teacher is loaded, the divergence
is computed from the cache (kd.loss.topk, or kd.loss.sampled for a sampled cache), and eval uses
the cached eval split.

store.py    the directory: manifest, fingerprints, shard files, the reader (TeacherCache)
build.py    running the teacher over the tokenised splits into shards (build_cache)
teacher.py  the cached teacher in the loop: CachedDistiller and cached_eval_sums
__main__.py the `python -m kd.cache` command

The loss math on cached rows is kd/loss/topk.py (top-k + one tail bucket, tail temperatures) and
kd/loss/sampled.py (importance-weighted draws: unbiased forward KL).
"""
