"""Memory plan before launch: per-GPU estimate of teacher shard, student states, activations and
logits for a config and a topology, from the model configs alone (no weights are loaded).

    python -m kd.plan --config configs/llama2-70b-to-7b.yaml --gpus 8 --nodes 1 --student-zero 2 --gpu-memory 80

The model is a sum of terms, each stated in the output; DeepSpeed's own buffers are approximated
by its bucket sizes and a fixed runtime reserve. Validated against measured peaks (see
tests/test_plan.py and docs/gpu.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from kd.cli import one_line_errors
from kd.config import Config, load_config
from kd.errors import KDError
from kd.models import resolve

GiB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Offline fallback for well-known hub models (this planner must work on a login node without
# hub access); any other model's config.json is read from the hub or a local directory.
KNOWN = {
    "meta-llama/Llama-2-70b-hf": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


@dataclass
class Shape:
    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab_rows: int
    largest_layer: int  # parameters of the biggest decoder layer (ZeRO-3 gathers one or two at once)
    heads: int
    trainable: int = 0  # parameters that train (all of them, or a LoRA student's adapters)
    head_trains: bool = True  # the lm_head gets a gradient (not under LoRA unless trained in full)


def model_shape(name_or_path: str, lora=None) -> Shape:
    """Exact parameter counts from the config, by building the model on the meta device (with
    `lora`, a kd.config.LoraConfig that is enabled, wrapped by peft there too: `trainable` counts the
    adapters and the modules trained in full). Any decoder transformers can build works; anything
    else is refused in one line. A local directory is read without touching the network."""
    from pathlib import Path

    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    path = resolve(name_or_path)
    try:
        # a local directory, or a model this planner knows, never waits on hub retries
        cfg = AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir() or name_or_path in KNOWN)
    except Exception:
        if name_or_path not in KNOWN:
            raise KDError(f"cannot read the config of {name_or_path!r} (no hub access? use a local path)") from None
        cfg = LlamaConfig(**KNOWN[name_or_path], tie_word_embeddings=False)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:
        raise KDError(f"kd.plan cannot plan {name_or_path!r} ({type(cfg).__name__}): transformers cannot build it as "
                      f"a causal LM ({str(e).splitlines()[0][:150] if str(e) else type(e).__name__})") from None
    # the decoder's layer stack: the longest ModuleList (model.layers, transformer.h, gpt_neox.layers, ...)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks or model.get_output_embeddings() is None:
        raise KDError(f"kd.plan cannot plan {name_or_path!r} ({type(model).__name__}): no decoder layer stack "
                      f"or output embedding found")
    layers = max(stacks, key=len)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    trainable = sum(p.numel() for p in model.parameters())
    if lora is not None and lora.enabled:
        if lora.init_from:  # the adapter's own settings decide its size
            from peft import LoraConfig as PeftLoraConfig

            lora_cfg = PeftLoraConfig.from_pretrained(lora.init_from)
            lora = type(lora)(rank=lora_cfg.r, target_modules=sorted(lora_cfg.target_modules),
                              modules_to_save=sorted(lora_cfg.modules_to_save or []))
        from kd.lora import wrap

        with torch.device("meta"):
            adapted = wrap(model, type(lora)(**{**lora.__dict__, "init_from": None}))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        head_trains = any(p.requires_grad for p in adapted.get_output_embeddings().parameters())
    else:
        head_trains = True
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden,
        layers=len(layers),
        vocab_rows=model.get_output_embeddings().weight.shape[0],
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        heads=cfg.num_attention_heads,
        trainable=trainable,
        head_trains=head_trains,
    )


def _dtype_bytes(name: str, gpu: bool) -> int:
    return _BYTES.get(name, 2 if gpu else 4)  # "auto" is bf16 on GPU, fp32 on CPU


def plan(cfg: Config, gpus: int, nodes: int = 1, student_zero: int = 2, gpu: bool = True,
         response_fraction: float = 0.5, offload_optimizer: bool = False) -> list[tuple[str, float]]:
    """-> [(term, bytes per device)]. `student_zero` 0 means plain DDP (no DeepSpeed)."""
    world = gpus * nodes
    t, s = model_shape(cfg.teacher.name_or_path), model_shape(cfg.student.name_or_path, cfg.student.lora)
    tb, sb = _dtype_bytes(cfg.teacher.dtype, gpu), _dtype_bytes(cfg.student.dtype, gpu)
    B, S = cfg.train.micro_batch_size, cfg.data.max_length
    N = int(B * S * response_fraction)  # response tokens per micro-batch
    V = max(t.vocab_rows, s.vocab_rows)
    mixed = sb < 4  # bf16 weights: fp32 master copy in the optimizer
    rows = []

    sharded_teacher = student_zero > 0 and cfg.teacher.zero3
    # the teacher is loaded even at alpha = 1 (eval metrics use it)
    rows.append(("teacher weights" + (" (ZeRO-3 shard)" if sharded_teacher else " (replica)"),
                 0 if cfg.teacher.offload else t.params * tb / (world if sharded_teacher else 1)))
    if sharded_teacher:
        rows.append(("teacher ZeRO-3 gathered layers (current + prefetch) and lm_head",
                     (2 * t.largest_layer + t.vocab_rows * t.hidden) * tb))
    rows.append(("teacher activations (one layer, no grad)", B * S * (2 * t.hidden + 3 * t.intermediate) * tb))

    # A LoRA student keeps all its weights, but grads and optimizer states cover only what trains.
    P, Tr = s.params, s.trainable
    lora = " (LoRA: adapters + modules trained in full)" if Tr < P else ""
    master_and_adam = Tr * (4 if mixed else 0) + 8 * Tr  # fp32 master (mixed precision) + Adam m, v
    if student_zero == 0:
        rows += [("student weights" + (" (base frozen + adapters)" if lora else ""), P * sb),
                 ("student grads" + lora, Tr * sb), ("student optimizer states" + lora, master_and_adam)]
    else:
        shard = world
        rows.append(("student weights" + (" (ZeRO-3 shard)" if student_zero == 3 else ""),
                     P * sb / (shard if student_zero == 3 else 1)))
        if student_zero == 3:
            rows.append(("student ZeRO-3 gathered layers and lm_head", (2 * s.largest_layer + s.vocab_rows * s.hidden) * sb))
        rows.append(("student grads (partitioned) + reduce bucket" + lora, Tr * sb / shard + s.hidden * s.hidden * 4))
        if not sb < 4:  # fp32 training still gets a flat fp32 partition for the optimizer
            master_and_adam = 4 * Tr + 8 * Tr
        rows.append(("student optimizer states (partitioned)" + lora,
                     0 if offload_optimizer else master_and_adam / shard))

    if cfg.student.gradient_checkpointing:
        act = s.layers * B * S * s.hidden * sb + B * S * (16 * s.hidden + 3 * s.intermediate) * sb
    else:
        act = s.layers * B * S * (10 * s.hidden + 3 * s.intermediate) * sb
    rows.append(("student activations" + (" (checkpointed)" if cfg.student.gradient_checkpointing else ""), act))
    if not gpu or cfg.student.attn_implementation == "eager":
        # no fused attention kernel (CPU, eager): scores and probabilities [B, heads, S, S] per layer
        saved = 1 if cfg.student.gradient_checkpointing else s.layers
        rows.append(("student attention scores (unfused attention)", saved * 2 * B * s.heads * S * S * sb))

    if cfg.loss.implementation == "chunked":
        rows.append(("loss: chunked logits" + (" + student lm_head grad buffer" if s.head_trains else ""),
                     6 * min(N, cfg.loss.chunk_size) * V * 4 + (s.vocab_rows * s.hidden * 4 if s.head_trains else 0)))
    else:  # student + teacher fp32 logits, two log-softmaxes, probabilities, the logits gradient
        rows.append(("loss: dense fp32 logits at response positions (6 x [N, V])", 6 * N * V * 4))
    return rows


def render(rows, gpu_memory_gib: float | None, reserve_gib: float) -> str:
    total = sum(b for _, b in rows) + reserve_gib * GiB
    width = max(len(r) for r, _ in rows) + 2
    lines = [f"{name:<{width}}{b / GiB:9.2f} GiB" for name, b in rows]
    lines.append(f"{'runtime reserve (CUDA context, NCCL, allocator)':<{width}}{reserve_gib:9.2f} GiB")
    lines.append(f"{'total per device':<{width}}{total / GiB:9.2f} GiB")
    if gpu_memory_gib:
        verdict = "fits" if total <= gpu_memory_gib * GiB * 0.95 else "DOES NOT FIT"
        lines.append(f"{verdict} in {gpu_memory_gib:g} GiB (keeping 5% headroom)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kd.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--student-zero", type=int, choices=(0, 2, 3), default=2, help="0 = DDP, 2 or 3 = ZeRO stage")
    ap.add_argument("--offload-optimizer", action="store_true", help="student optimizer states in CPU memory")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32, no runtime reserve)")
    ap.add_argument("--response-fraction", type=float, default=0.5, help="share of tokens that are response")
    args, overrides = ap.parse_known_args(argv)
    with one_line_errors():
        cfg = load_config(args.config, overrides)
        rows = plan(cfg, args.gpus, args.nodes, args.student_zero, gpu=not args.cpu,
                    response_fraction=args.response_fraction, offload_optimizer=args.offload_optimizer)
    topo = f"{args.nodes} node(s) x {args.gpus} {'processes' if args.cpu else 'GPUs'}, student " + \
        ("DDP" if args.student_zero == 0 else f"ZeRO-{args.student_zero}")
    print(f"memory plan for {args.config}: {topo}, micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.max_length} tokens")
    print(render(rows, None if args.cpu else args.gpu_memory, 0.0 if args.cpu else 3.0))


if __name__ == "__main__":
    main()
