"""Chat data at scale: tokenise-once startup and per-rank memory, and padded vs packed vs
length-grouped micro-batches, on a synthetic long-tailed conversation set with a real
32000-entry LLaMA tokenizer (shipped in mistral-common), tiny models, CPU.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_data.py --part store [--conversations 200000]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_data.py --part packing [--examples 128]
        [--data longtail|demo|short] [--attn sdpa|eager]

store:   the same config built three ways in fresh child processes: (1) data.store=off, today's
         in-memory path that every rank repeats at every start; (2) the first start with the store
         (tokenise + write); (3) the second start (memory-map). Then 2 child "ranks" each hold the
         train split the in-memory way and the memory-mapped way and report their private
         (anonymous) resident memory after reading every row.
packing: one epoch over the same examples, micro-batch 8, as a KD step (teacher forward +
         chunked loss forward/backward + AdamW), padded / packed into rows of at most max_length /
         packed into one row (before issue 21) / length-grouped, alternated in one process: response tokens/s, the share of teacher-forward tokens that are padding,
         and the per-step losses of padded vs packed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his her an which were are this be had "
         "not have one their it all but they there been has who more when some into other what time "
         "than only new two would first could after most over such many these then also made about "
         "carry digit answer step value number list count result sum total check each because").split()


def tokenizer_dir(d: Path) -> Path:
    import mistral_common

    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return d


def synthetic(path: Path, n: int, seed: int = 0) -> None:
    """Conversations of 1-4 exchanges; words per turn log-normal so that a conversation has a median
    of ~300 tokens and a p99 of ~2,000 (about 1.3 tokens per word with this vocabulary)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            turns = rng.choice((1, 1, 2, 2, 3, 4))
            total = min(6000, int(rng.lognormvariate(5.45, 0.8)))  # words in the whole conversation
            msgs = [{"from": "system", "value": "Think step by step and check each result."}]
            for _ in range(turns):
                q = max(3, total // (turns * 4))
                a = max(3, total // turns - q)
                msgs.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=q)) + "?"})
                msgs.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=a)) + "."})
            fh.write(json.dumps({"conversations": msgs}) + "\n")


def short_answers(path: Path, n: int, seed: int = 0) -> None:
    """Single-turn records with short prompts and answers (a classification or extraction set):
    4-40 words of prompt, 1-12 of answer."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            rec = {"system": "Answer with the label only.", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 40))),
                   "response": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}
            fh.write(json.dumps(rec) + "\n")


CHILD = r"""
import json, sys, time, os
sys.path.insert(0, {root!r})
from kd.config import DataConfig
from kd.data import build_datasets
from kd.models import load_tokenizer
mode = sys.argv[1]
tok = load_tokenizer({tok!r}, chat_template="llama2")
cfg = DataConfig(train_files=[{data!r}], eval_fraction=0.01, max_length=4096, num_proc={procs},
                 store="off" if mode == "memory" else {store!r})
t0 = time.perf_counter()
train, evald, stats, _ = build_datasets(cfg, tok, 0, log=lambda *a: None)
dt = time.perf_counter() - t0
if mode.startswith("rss"):
    import datasets
    if mode == "rss-memory":  # what today's path holds: the tokenised split in the process's own memory
        train = datasets.load_from_disk(train.cache_files[0]["filename"].rsplit("/", 1)[0], keep_in_memory=True)
    n = 0
    for row in train.with_format("numpy").iter(batch_size=4096):
        n += len(row["teacher_ids"])
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    print(json.dumps({{"rss_anon_mib": int(status["RssAnon"].split()[0]) / 1024,
                      "rss_file_mib": int(status["RssFile"].split()[0]) / 1024, "rows": n}}))
elif mode == "verify":  # a second start's integrity work, timed apart: the data's content hash, the store's check
    from kd.data.store import check, fingerprint, store_root
    t1 = time.perf_counter()
    path = store_root(cfg) / fingerprint(cfg, tok, 0)
    t2 = time.perf_counter()
    assert check(path) is None
    t3 = time.perf_counter()
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    from pathlib import Path
    print(json.dumps({{"seconds": dt, "fingerprint_s": t2 - t1, "check_s": t3 - t2,
                      "data_mib": Path({data!r}).stat().st_size / 2**20, "store_mib": size(path) / 2**20}}))
else:
    print(json.dumps({{"seconds": dt, "examples": stats.examples, "target_tokens": stats.target_tokens,
                      "teacher_tokens": sum(len(x) for x in train["teacher_ids"])}}))
"""


def child(code: str, mode: str) -> dict:
    env = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_store(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="kd-bench-data-"))
    try:
        tok = tokenizer_dir(work / "tok")
        data = work / "conversations.jsonl"
        t0 = time.perf_counter()
        synthetic(data, args.conversations)
        print(f"synthetic set: {args.conversations} conversations, {data.stat().st_size / 2**20:.0f} MiB "
              f"({time.perf_counter() - t0:.0f} s to write)")
        code = CHILD.format(root=str(ROOT), tok=str(tok), data=str(data), procs=args.num_proc,
                            store=str(work / "store"))
        memory = child(code, "memory")
        first = child(code, "first")
        second = child(code, "second")
        verify = child(code, "verify")
        lens = json.loads(subprocess.run([sys.executable, "-c", code.replace('mode = sys.argv[1]', 'mode = "x"')
                                          + "\nimport numpy as np\nl = np.array([len(x) for x in train['teacher_ids']])"
                                          "\nprint(json.dumps({'p50': float(np.median(l)), 'p99': float(np.percentile(l, 99))}))",
                                          "x"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"tokens per conversation (teacher view): median {lens['p50']:.0f}, p99 {lens['p99']:.0f}; "
              f"{first['examples']} train examples, {first['target_tokens']:,} target tokens")
        print("\n| start | wall s | ratio to in-memory |\n|---|---:|---:|")
        for name, r in (("in-memory tokenising (data.store=off), every rank, every start", memory),
                        ("first start with the store (tokenise + write)", first),
                        ("second start (memory-map the store)", second)):
            print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / memory['seconds']:.3f} |")
        print(f"\nof a second start ({verify['seconds']:.2f} s): the data's content hash "
              f"({verify['data_mib']:.0f} MiB) {verify['fingerprint_s']:.2f} s, the store's checksums "
              f"({verify['store_mib']:.0f} MiB) {verify['check_s']:.2f} s")
        procs = {m: [subprocess.Popen([sys.executable, "-c", code, m], stdout=subprocess.PIPE, text=True)
                     for _ in range(2)] for m in ("rss-memory",)}
        held = {m: [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps] for m, ps in procs.items()}
        procs = [subprocess.Popen([sys.executable, "-c", code, "rss-mmap"], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        held["rss-mmap"] = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        print("\n| 2 ranks, after reading every row | private RSS per rank MiB | file-backed RSS per rank MiB |"
              "\n|---|---:|---:|")
        for name, key in (("in memory (today's path)", "rss-memory"), ("memory-mapped store", "rss-mmap")):
            r = held[key]
            print(f"| {name} | {sum(x['rss_anon_mib'] for x in r) / 2:.0f} | {sum(x['rss_file_mib'] for x in r) / 2:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def part_packing(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.config import DataConfig
    from kd.data import MicroBatchSampler, build_datasets, collate, collate_packed, example_lengths
    from kd.forward import Distiller, head, teacher_forward
    from kd.loss import LossSpec
    from kd.models import load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(tempfile.mkdtemp(prefix="kd-bench-pack-"))
    try:
        tok = load_tokenizer(str(tokenizer_dir(work / "tok")), chat_template="llama2")
        data = work / "c.jsonl"
        if args.data == "longtail":
            synthetic(data, args.examples, seed=1)
        elif args.data == "short":
            short_answers(data, args.examples, seed=1)
        else:  # the shipped demo set
            with open(ROOT / "data/demo/train.jsonl") as src:
                data.write_text("".join(line for _, line in zip(range(args.examples), src)))
        max_length = args.max_length or {"longtail": 1024, "demo": 384, "short": 256}[args.data]
        cfg = DataConfig(train_files=[str(data)], eval_fraction=0, max_length=max_length, store="off")
        train, _, stats, _ = build_datasets(cfg, tok, 0, log=lambda *a: None)
        rows = list(train)

        def model(h, layers, seed):
            torch.manual_seed(seed)
            return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=2 * h,
                                                num_hidden_layers=layers, num_attention_heads=4,
                                                attn_implementation=args.attn))

        (tl, th), (sl, sh) = (tuple(map(int, x.split("x"))) for x in (args.teacher, args.student))
        teacher = model(th, tl, 1).eval().requires_grad_(False)
        spec = LossSpec(len(tok), alpha=0.5, temperature=2.0)
        mb = 8
        plain = MicroBatchSampler(len(rows), mb, seed=0)
        grouped = MicroBatchSampler(len(rows), mb, seed=0, lengths=example_lengths(train))
        one_row = lambda ex, pad: collate_packed(ex, pad, row_tokens=1 << 30)  # noqa: E731 (before issue 21)
        rows_of = lambda ex, pad: collate_packed(ex, pad, row_tokens=max_length)  # noqa: E731
        modes = {"padded": (plain, collate), "packed": (plain, rows_of), "packed, one row per micro-batch": (plain, one_row),
                 "length-grouped": (grouped, collate)}
        state = {}
        for name in modes:
            student = model(sh, sl, 2)
            state[name] = (student, Distiller(student, spec), torch.optim.AdamW(student.parameters(), lr=1e-3,
                                                                                 fused=True))
        results = {name: {"s": 0.0, "tokens": 0, "fed": 0, "pad": 0, "losses": []} for name in modes}
        for k in range(plain.per_epoch):
            for name, (sampler, fn) in modes.items():  # alternated: the machine's drift hits all alike
                batch = fn([rows[i] for i in sampler.indices(k)], tok.pad_token_id)
                student, distiller, opt = state[name]
                t0 = time.perf_counter()
                h = teacher_forward(teacher, batch)
                parts = distiller(batch, h, head(teacher))
                (parts["weighted_sum"] / batch["labels"].numel()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                r = results[name]
                r["s"] += time.perf_counter() - t0
                r["tokens"] += batch["labels"].numel()
                fed = batch["teacher_input_ids"].numel()
                real = sum(len(rows[i]["teacher_ids"]) for i in sampler.indices(k))  # a packed row's tail pads too
                r["fed"] += fed
                r["pad"] += fed - real
                r["losses"].append(parts["weighted_sum"].item() / batch["labels"].numel())
        base = results["padded"]["tokens"] / results["padded"]["s"]
        print(f"{args.data}: {len(rows)} examples ({stats.target_tokens:,} target tokens; max_length {max_length}), "
              f"micro-batch {mb}, one epoch = {plain.per_epoch} steps; teacher {args.teacher}, student {args.student} "
              f"(layers x hidden), vocab 32000, {args.attn}, {torch.get_num_threads()} threads\n")
        print("| micro-batches | response tokens/s | vs padded | teacher-forward tokens that are padding |")
        print("|---|---:|---:|---:|")
        for name, r in results.items():
            tps = r["tokens"] / r["s"]
            print(f"| {name} | {tps:.0f} | {tps / base:.2f}x | {r['pad'] / r['fed']:.1%} |")
        a, b = results["padded"]["losses"], results["packed"]["losses"]
        diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        print(f"\npadded vs packed per-step loss: max relative difference {diff:.1e} over {len(a)} steps "
              f"(first {a[0]:.4f} / {b[0]:.4f}, last {a[-1]:.4f} / {b[-1]:.4f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("store", "packing"), required=True)
    ap.add_argument("--conversations", type=int, default=200_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--data", choices=("longtail", "demo", "short"), default="longtail",
                    help="packing: long-tailed ShareGPT-style conversations, the shipped demo set, or short answers")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--max-length", type=int, default=0, help="packing: data.max_length (0: 1024/384/256 by --data)")
    ap.add_argument("--teacher", default="8x384", help="layers x hidden of the packing benchmark's teacher")
    ap.add_argument("--student", default="4x256", help="layers x hidden of its student")
    args = ap.parse_args()
    part_store(args) if args.part == "store" else part_packing(args)


if __name__ == "__main__":
    main()
