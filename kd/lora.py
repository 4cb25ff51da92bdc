"""LoRA students: wrap a loaded student with peft adapters; turn a trained one back into weights.

With `student.lora.rank > 0` (or `student.lora.init_from`) only the adapters and the modules named
in `student.lora.modules_to_save` train. The loss reads the decoder's hidden states and the
output layer's weight directly (kd.forward), so it needs the adapters folded into the decoder
(peft injects them in place) and an output layer without one: an adapter on lm_head is refused.
"""

from __future__ import annotations

import copy
import warnings

import torch

from kd.config import LoraConfig
from kd.errors import ConfigError, ModelError

ADAPTER = "default"  # peft's name for the one adapter a student carries


def is_adapted(model) -> bool:
    """A peft-wrapped model (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def wrap(student, lora: LoraConfig):
    """The student with LoRA adapters (new, or loaded from lora.init_from), adapters trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        # a tied lm_head trained in full is untied on purpose (describe() says so), not a hazard;
        # peft asks transformers about checkpointing through a name transformers deprecates
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if lora.init_from:
            try:
                model = PeftModel.from_pretrained(student, lora.init_from, is_trainable=True)
            except Exception as e:  # noqa: BLE001 (a missing or foreign adapter: one line)
                raise ModelError(f"student.lora.init_from={lora.init_from}: cannot load the adapter "
                                 f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        else:
            targets = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
            try:
                model = get_peft_model(student, PeftLoraConfig(
                    r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                    modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM"))
            except ValueError as e:  # e.g. a target module the model does not have
                raise ConfigError(f"student.lora: {str(e).splitlines()[0][:300]}") from None
    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise ConfigError("student.lora.target_modules puts an adapter on the output layer; the loss projects "
                          "with its weight directly, so train it in full with student.lora.modules_to_save=[lm_head]")
    return model


def describe(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    cfg = model.peft_config[ADAPTER]
    saved = f", in full: {', '.join(sorted(cfg.modules_to_save))}" if cfg.modules_to_save else ""
    if cfg.modules_to_save and getattr(model.config, "tie_word_embeddings", False):
        saved += " (untied from the input embedding)"
    kinds = sorted({name.rsplit(".", 1)[-1] for name in cfg.target_modules})  # all-linear lists every layer's
    return (f"student: LoRA rank {cfg.r}, alpha {cfg.lora_alpha:g} on {', '.join(kinds)}{saved}; "
            f"{trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.2%})")


def merged(model, state_dict: dict[str, torch.Tensor]):
    """A plain transformers model with the adapters of `model` (a PeftModel) folded into its
    weights, whose values come from `state_dict` (the PeftModel's full state, e.g. gathered from
    ZeRO-3 partitions). The skeleton is built on the meta device and takes the tensors of
    `state_dict` as they are, so the base weights are never held twice."""
    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        # the class itself, not from_config: under ZeRO-3 that would partition (a collective) on rank 0 alone
        skeleton = type(base)(copy.deepcopy(base.config))
        skeleton = get_peft_model(skeleton, copy.deepcopy(model.peft_config[ADAPTER]))
    missing, unexpected = skeleton.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(f"cannot merge the LoRA student: state keys do not match (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    with warnings.catch_warnings():  # peft's note that a fully trained lm_head is now untied
        warnings.filterwarnings("ignore", message=".*no longer tied.*")
        out = skeleton.merge_and_unload()
    # rotary tables and other non-persistent buffers are not in any state dict: take the live ones
    live = dict(base.named_buffers())
    for name, buf in list(out.named_buffers()):
        if buf.is_meta and name in live:
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner).register_buffer(leaf, live[name].detach().cpu().clone(), persistent=False)
    emb, head = out.get_input_embeddings().weight, out.get_output_embeddings().weight
    if getattr(out.config, "tie_word_embeddings", False) and (emb.shape != head.shape or not torch.equal(emb, head)):
        out.config.tie_word_embeddings = False  # lm_head trained in full (modules_to_save): keep both
    return out
