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
    `<view>_index` of its [B, L] ids: [N, H]. A packed batch (one row, `<view>_position_ids`
    restarting at each example, no attention mask) keeps its examples apart through the
    position ids (transformers builds the block-diagonal causal mask from them)."""
    out = body(model)(input_ids=batch[f"{view}_input_ids"], attention_mask=batch.get(f"{view}_attention_mask"),
                           position_ids=batch.get(f"{view}_position_ids"), use_cache=False)
    return rearrange(out.last_hidden_state, "b l h -> (b l) h").index_select(0, batch[f"{view}_index"])


@torch.no_grad()
def isolates_packed_sequences(model, vocab_size: int) -> bool:
    """Does this model, with its attention implementation, keep packed examples apart given only
    restarting position ids? Checked by running two short sequences separately and packed (the
    same on every rank, so it is safe for a ZeRO-3 partitioned model)."""
    device, was_training = next(model.parameters()).device, model.training
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab_size, (1, n), generator=g).to(device) for n in (6, 5))
    model.eval()  # no dropout: the check must not draw from the training RNG
    separate = torch.cat([body(model)(input_ids=x, use_cache=False).last_hidden_state[0] for x in (a, b)])
    pos = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    packed = body(model)(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).last_hidden_state[0]
    model.train(was_training)
    err = (packed.float() - separate.float()).abs().max() / separate.float().abs().max().clamp_min(1e-6)
    return bool(err < 1e-2)


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
