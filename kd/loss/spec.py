"""The loss options in one frozen object, built once from `cfg.loss` and passed to every loss.

The dense (`kd.loss.dense`), chunked (`kd.loss.chunked`) and cached-teacher (`kd.loss.topk`)
losses take a `LossSpec` instead of repeating six keywords each, so a new option is added in one
place and no call site can pass one loss a different temperature than another.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
IMPLEMENTATIONS = ("chunked", "dense")
# Same as F.cross_entropy's default: a label equal to it is excluded from both terms and the count.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossSpec:
    """loss = alpha * CE + (1 - alpha) * T^2 * D(p_teacher^T || p_student^T), summed over tokens.

    vocab_size      the tokenizer's real vocabulary; logits with more columns (padded embedding
                    matrices) are cut to it, so teacher and student share one support
    alpha           weight of the hard-label CE (T = 1); 1 - alpha weighs the divergence
    temperature     T on both sides of D; D is scaled by T^2
    divergence      one of DIVERGENCES (see kd.loss.dense.divergence_from_logprobs)
    beta            JSD interpolation (0 = forward KL, 1 = reverse KL)
    skew            skew-KL mixing weight (0 = plain KL)
    implementation  chunked (default path) or dense (the reference); read by the Distillers
    chunk_size      rows projected at once by the chunked paths
    """

    vocab_size: int
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    implementation: str = "chunked"
    chunk_size: int = 1024

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {self.implementation!r}; choose one of {IMPLEMENTATIONS}")
        if self.vocab_size < 1 or self.chunk_size < 1:
            raise ValueError(f"vocab_size and chunk_size must be >= 1, got {self.vocab_size}, {self.chunk_size}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {self.alpha}, {self.temperature}")
        # floats once here, so no loss sees an int temperature and computes T^2 in integers
        for name in ("alpha", "temperature", "beta", "skew"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_config(cls, loss, vocab_size: int) -> "LossSpec":
        """From a `kd.config.LossConfig` (already validated) and the tokenizer's size."""
        return cls(vocab_size=vocab_size, alpha=loss.alpha, temperature=loss.temperature,
                   divergence=loss.divergence, beta=loss.beta, skew=loss.skew,
                   implementation=loss.implementation, chunk_size=loss.chunk_size)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha < 1.0

    def replace(self, **changes) -> "LossSpec":
        """A copy with some fields changed (e.g. alpha=1.0 for a CE-only pass)."""
        return dataclasses.replace(self, **changes)

    def divergence_text(self) -> str:
        """D in words, endpoints resolved as the losses resolve them."""
        d, b, k = self.divergence, self.beta, self.skew
        if d == "forward_kl" or (d == "jsd" and b == 0.0) or (d == "skew_forward_kl" and k == 0.0):
            return "KL(teacher‖student)"
        if d == "reverse_kl" or (d == "jsd" and b == 1.0) or (d == "skew_reverse_kl" and k == 0.0):
            return "KL(student‖teacher)"
        if d == "jsd":
            return f"JSD(β={b:g})(teacher, student)"
        if d == "skew_forward_kl":
            return f"KL(teacher‖{k:g}·teacher+{1 - k:g}·student)"
        if d == "skew_reverse_kl":
            return f"KL(student‖{k:g}·student+{1 - k:g}·teacher)"
        return "TVD(teacher, student)"

    def describe(self) -> str:
        """The per-token objective in words and numbers, its coefficients read back from mix()."""
        ce, kd = self.mix(1.0, 0.0), self.mix(0.0, 1.0)
        T = self.temperature
        kd_text = f"{1.0 - self.alpha:g}·T²(={T * T:g})·{self.divergence_text()} at T={T:g}"
        assert math.isclose(kd, (1.0 - self.alpha) * T * T)  # the words are the loss's own coefficients
        parts = ([f"{ce:g}·CE"] if ce else []) + ([kd_text] if kd else [])
        return " + ".join(parts)

    def mix(self, ce_sum, kd_sum):
        """The loss convention in one place: alpha * CE + (1 - alpha) * T^2 * D."""
        return self.alpha * ce_sum + (1.0 - self.alpha) * self.temperature**2 * kd_sum
