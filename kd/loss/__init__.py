"""Distillation losses, pure fp32 tensor functions returning token sums (never means).

spec.py     LossSpec: the frozen loss options, built once from cfg.loss and passed everywhere
dense.py    the reference on full logits: CE, the six divergences, LossParts
chunked.py  the default path from hidden states, chunk by chunk, never a [tokens, vocab] tensor
topk.py     against a teacher given by cached top-k logits plus one tail bucket (kd.cache)
sampled.py  against a teacher given by cached samples: unbiased forward KL (kd.cache --format sampled)

One contract for all of them: loss = alpha*CE + (1-alpha)*T^2*D(p_t^T || p_s^T); a label equal to
IGNORE_INDEX adds to neither term nor to `n_tokens`.
"""

from kd.loss.chunked import chunked_kd_loss
from kd.loss.dense import LossParts, divergence_from_logprobs, kd_loss, token_losses
from kd.loss.spec import DIVERGENCES, IGNORE_INDEX, LossSpec
from kd.loss.sampled import CachedSample, sampled_kd_loss
from kd.loss.topk import CachedTopK, topk_kd_loss

__all__ = ["DIVERGENCES", "IGNORE_INDEX", "CachedSample", "CachedTopK", "LossParts", "LossSpec", "chunked_kd_loss",
           "divergence_from_logprobs", "kd_loss", "sampled_kd_loss", "token_losses", "topk_kd_loss"]
