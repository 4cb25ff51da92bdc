"""The cached teacher inside the training loop: the Distiller and eval sums on cached rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.cache.store import TeacherCache
from kd.distributed import gathered
from kd.forward import Distiller, fp32_logits, head, response_hidden
from kd.loss.dense import divergence_from_logprobs
from kd.loss.sampled import CachedSample, sampled_forward_kl, sampled_kd_loss
from kd.loss.topk import CachedTopK, bucket_logprobs, topk_kd_loss
from kd.loss.spec import LossSpec


class CachedDistiller(Distiller):
    """The Distiller with the teacher replaced by cached rows: forward(batch, CachedTopK,
    CachedSample or None, ignored) -> the same token sums. loss.implementation=chunked projects and scores
    `loss.chunk_size` student rows at a time under activation checkpointing, so backward holds
    one chunk's [rows, V] at a time (the analytic kernels of kd.chunked need the teacher's rows)."""

    def forward(self, batch: dict, cached: CachedTopK | None, teacher_head=None, spec: LossSpec | None = None):
        spec = spec or self.spec  # the Distiller's signature; kd.train passes None (on-policy refuses a cache)
        spec = spec if cached is not None else spec.replace(alpha=1.0)
        h = response_hidden(self.student, batch, "student")
        s_head = head(self.student)
        labels = batch["labels"]
        if cached is None:  # CE only (alpha = 1): empty teacher rows keep one code path
            n = labels.shape[0]
            cached = CachedTopK(labels.new_zeros(n, 0), h.new_zeros(n, 0), h.new_zeros(n, 1), h.new_ones(1))
        if isinstance(cached, CachedSample):
            fixed = cached[4:]  # temperatures and proposal: not per row
            temps = cached.temperatures.tolist()  # once per micro-batch, not once per chunk
            rows = (h, labels, *cached[:4])

            def sums(h_c, labels_c, *cached_c):
                p = sampled_kd_loss(fp32_logits(h_c, s_head), CachedSample(*cached_c, *fixed), labels_c, spec,
                                    temperatures=temps)
                return p.weighted_sum, p.ce_sum, p.kd_sum
        else:
            temps = cached.tail_temperatures.tolist()
            rows = (h, labels, cached.ids, cached.logits, cached.tail_lse)

            def sums(h_c, labels_c, ids_c, logits_c, tail_c):
                p = topk_kd_loss(fp32_logits(h_c, s_head), ids_c, logits_c, tail_c, labels_c, spec,
                                 tail_temperatures=temps)
                return p.weighted_sum, p.ce_sum, p.kd_sum

        chunk = spec.chunk_size
        if spec.implementation == "chunked" and h.shape[0] > chunk:
            from torch.utils.checkpoint import checkpoint

            out = [checkpoint(sums, *(t[i:i + chunk] for t in rows), use_reentrant=False)
                   for i in range(0, h.shape[0], chunk)]
            weighted, ce, kd = (torch.stack(list(x)).sum() for x in zip(*out))
        else:
            weighted, ce, kd = sums(*rows)
        return dict(weighted_sum=weighted, ce_sum=ce, kd_sum=kd)


@torch.no_grad()
def cached_eval_sums(student, cache: TeacherCache, batch: dict, spec: LossSpec) -> dict[str, torch.Tensor]:
    """`kd.forward.eval_sums` against the cached eval split: CE (exact), the bucketed divergence (top-k)
    or its unbiased estimate (sampled), the configured total, and top-1 agreement (top-k: exact, the
    cached ids are sorted; sampled: with the most probable drawn id, the teacher's top-1 unless it
    was never drawn)."""
    hs = response_hidden(student, batch, "student")
    with gathered(head(student).weight):  # ZeRO-3: the head is used outside its module's forward
        s_logits = fp32_logits(hs, head(student))[:, :spec.vocab_size]
    rows = cache.lookup(batch, "eval")
    ce = F.cross_entropy(s_logits, batch["labels"], reduction="none").sum()
    tokens = torch.tensor(float(batch["labels"].numel()), device=hs.device)
    if isinstance(rows, CachedSample):
        kd = sampled_forward_kl(s_logits, rows, spec.temperature).sum() if spec.needs_teacher else ce.new_zeros(())
        top = rows.ids.gather(-1, torch.where(rows.freq > 0, rows.logq, float("-inf")).argmax(-1, keepdim=True))
        agree = (s_logits.argmax(-1) == top[:, 0]).sum().float() if rows.ids.shape[0] else ce.new_zeros(())
        return dict(ce=ce, kd=kd, loss=spec.mix(ce, kd), top1_agreement=agree, tokens=tokens)
    t_logp, s_logp = bucket_logprobs(s_logits, rows.ids, rows.logits, rows.tail_lse, vocab_size=spec.vocab_size,
                                     temperature=spec.temperature, tail_temperatures=rows.tail_temperatures)
    kd = divergence_from_logprobs(t_logp, s_logp, spec.divergence, beta=spec.beta, skew=spec.skew).sum()
    agree = (s_logits.argmax(-1) == rows.ids[:, 0]).sum().float() if rows.ids.shape[0] else ce.new_zeros(())
    return dict(ce=ce, kd=kd, loss=spec.mix(ce, kd), top1_agreement=agree, tokens=tokens)
