"""Model forwards that stop at the hidden states of response positions, and the loss on them.

Neither model ever projects padding or prompt positions through its lm_head: the decoder body
runs on the whole sequence, then only the N rows that predict response tokens are kept. The
dense path projects those rows to [N, V] logits in fp32; the chunked path never builds [N, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kd.distributed import gathered
from kd.errors import ConfigError
from kd.lora import is_adapted
from kd.loss.chunked import chunked_kd_loss
from kd.loss.dense import kd_loss, token_losses
from kd.loss.spec import LossSpec


def body(model) -> nn.Module:
    """The decoder stack under the lm_head, which returns hidden states. For a peft (LoRA) student
    that is its base model's, where peft has put the adapters in place."""
    if is_adapted(model):
        model = model.get_base_model()
    return model.base_model


def response_hidden(model, batch: dict, view: str) -> torch.Tensor:
    """Final (normed) hidden states of one view (`teacher` or `student`) at the flat positions
    `<view>_index` of its [B, L] ids: [N, H]. A packed batch (rows of several examples,
    `<view>_position_ids` restarting at each, no attention mask) keeps its examples apart through
    the position ids (transformers builds the block-diagonal causal mask from them)."""
    out = body(model)(input_ids=batch[f"{view}_input_ids"], attention_mask=batch.get(f"{view}_attention_mask"),
                           position_ids=batch.get(f"{view}_position_ids"), use_cache=False)
    return rearrange(out.last_hidden_state, "b l h -> (b l) h").index_select(0, batch[f"{view}_index"])


# A model that keeps packed examples apart gives one example's hidden states bit for bit whatever
# the other example's tokens are (their keys are masked to exact zeros); 1e-5 is far above that
# and far below the 1e-4..1e-2 a model that leaks a little shows.
ISOLATION_TOLERANCE = 1e-5


@torch.no_grad()
def packing_leak(model, vocab_size: int) -> tuple[float, float]:
    """-> (leak, position error) of this model, with its attention implementation, on two short
    examples packed in one row with restarting position ids and no mask. leak: how far the second
    example's hidden states move when the first's tokens change (0 when the model isolates them;
    relative to their size). position error: packed against run alone, relative (rounding of the
    model's dtype, or far more for a model that ignores position ids). The same on every rank, so
    it is safe for a ZeRO-3 partitioned model."""
    device, was_training = next(model.parameters()).device, model.training
    g = torch.Generator().manual_seed(0)
    a, a2, b = (torch.randint(0, vocab_size, (1, n), generator=g).to(device) for n in (6, 6, 5))
    pos = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    run = lambda ids, p=None: body(model)(input_ids=ids, position_ids=p, use_cache=False).last_hidden_state.float()  # noqa: E731
    model.eval()  # no dropout: the check must not draw from the training RNG
    try:
        alone = torch.cat([run(a)[0], run(b)[0]])
        packed, changed = run(torch.cat([a, b], 1), pos)[0], run(torch.cat([a2, b], 1), pos)[0]
        rows = run(torch.cat([torch.cat([a, b], 1), torch.cat([a2, b], 1)]), pos.expand(2, -1))  # as batches come
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    err = max((packed - alone).abs().max(), (rows[0] - alone).abs().max(), (rows[1, 6:] - alone[6:]).abs().max())
    return float((changed[6:] - packed[6:]).abs().max() / scale), float(err / scale)


def position_tolerance(model) -> float:
    """Packed vs alone differ by the model dtype's rounding (different shapes, other kernels)."""
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype == torch.float32 else 5e-2


def isolates_packed_sequences(model, vocab_size: int) -> bool:
    return _isolates(model, *packing_leak(model, vocab_size))


def _isolates(model, leak: float, err: float) -> bool:
    return leak <= ISOLATION_TOLERANCE and err <= position_tolerance(model)


def packing_refusal(role: str, model, vocab_size: int) -> None:
    """data.packing=true: a ConfigError naming what the probe measured unless `model` keeps
    packed examples apart. The advice never names the attention implementation in use."""
    leak, err = packing_leak(model, vocab_size)
    if _isolates(model, leak, err):
        return
    impl = getattr(model.config, "_attn_implementation", None) or "default"
    others = [i for i in ("sdpa", "eager", "flash_attention_2") if i != impl]
    what = (f"lets packed examples see each other (one example's hidden states move by {leak:.1e} of their "
            f"size when the other's tokens change)" if leak > ISOLATION_TOLERANCE else
            f"does not restart positions at each packed example (hidden states {err:.1e} off their "
            f"value run alone)")
    raise ConfigError(f"data.packing=true: the {role} ({type(model).__name__}, attn_implementation={impl}) {what}; "
                      f"set data.packing=false, or try {role}.attn_implementation={' or '.join(others)} if this "
                      f"architecture builds its mask from position ids there")


def head(model) -> nn.Linear:
    return model.get_output_embeddings()


def fp32_logits(hidden: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
    """[N, H] -> [N, V] in fp32 with autocast off: bf16 logits would bias the divergence."""
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if lm_head.bias is None else lm_head.bias.float()
        return F.linear(hidden.float(), lm_head.weight.float(), bias)


@torch.no_grad()
def teacher_forward(teacher, batch: dict) -> torch.Tensor:
    """Teacher hidden states at the response positions of its own view: [N, Ht]."""
    return response_hidden(teacher, batch, "teacher")


class Distiller(nn.Module):
    """The student and its loss in one module, so DDP/DeepSpeed wrap the whole forward.

    forward(batch, teacher_hidden, teacher_head) -> dict of token sums (see LossParts): the
    caller divides `weighted_sum` by the global response-token count before backward.
    """

    def __init__(self, student, spec: LossSpec):
        super().__init__()
        self.student = student
        self.config = student.config  # DeepSpeed sizes its "auto" buckets from config.hidden_size
        self.spec = spec

    def register_zero3_head(self) -> None:
        """Under ZeRO-3 (call after the engine partitioned the student): the loss uses lm_head.weight
        outside lm_head.forward, so this module's forward must gather it."""
        weight = head(self.student).weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, batch: dict, teacher_hidden: torch.Tensor | None, teacher_head: nn.Linear | None,
                spec: LossSpec | None = None):
        spec = spec or self.spec  # another spec for this batch, e.g. on-policy: the divergence alone
        h = response_hidden(self.student, batch, "student")
        use_teacher = teacher_hidden is not None and spec.needs_teacher
        s_head = head(self.student)
        if spec.implementation == "chunked":
            with torch.autocast(h.device.type, enabled=False):
                parts = chunked_kd_loss(
                    h, s_head.weight, teacher_hidden if use_teacher else None,
                    teacher_head.weight if use_teacher else None, batch["labels"], spec,
                    student_bias=s_head.bias, teacher_bias=teacher_head.bias if use_teacher else None,
                )
        else:
            t_logits = fp32_logits(teacher_hidden, teacher_head) if use_teacher else None
            parts = kd_loss(fp32_logits(h, s_head), t_logits, batch["labels"], spec)
        return dict(weighted_sum=parts.weighted_sum, ce_sum=parts.ce_sum, kd_sum=parts.kd_sum)


@torch.no_grad()
def eval_sums(student, teacher, batch: dict, spec: LossSpec) -> dict[str, torch.Tensor]:
    """Token sums for evaluation: student CE, divergence to the teacher (whatever alpha is),
    the configured total, and top-1 teacher-student agreement."""
    hs = response_hidden(student, batch, "student")
    ht = teacher_forward(teacher, batch)
    # after both forwards: under ZeRO-3 a tied lm_head is released again when the embedding runs
    with gathered(head(student).weight, head(teacher).weight):
        s_logits = fp32_logits(hs, head(student))[:, :spec.vocab_size]
        t_logits = fp32_logits(ht, head(teacher))[:, :spec.vocab_size]
    ce, kd = token_losses(s_logits, t_logits, batch["labels"], spec)
    ce, kd = ce.sum(), kd.sum()
    agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().float()
    tokens = torch.tensor(float(batch["labels"].numel()), device=hs.device)
    return dict(ce=ce, kd=kd, loss=spec.mix(ce, kd), top1_agreement=agree, tokens=tokens)
