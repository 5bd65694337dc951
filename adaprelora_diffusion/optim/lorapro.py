"""LoRA-Pro in its SGD form: the LoRA step whose W-move is the Frobenius projection of G.

A baseline of the design space: the identity metric on W (no preconditioner) and the gauge
that keeps the factor steps closest to plain LoRA gradients (a Sylvester equation). No
per-pair state, O((m + n) r) transient memory. Written here because no maintained package
ships it; the math is in `closed_form.lorapro_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import Gathered, LoraPairOptimizer, _check
from .closed_form import lorapro_step

__all__ = ["LoRAPro"]


class LoRAPro(LoraPairOptimizer):
    r"""SGD with LoRA-Pro's equivalent gradients.

    With `Ga = A.grad / s`, `Gb = B.grad / s`: `dA = (B^T B)^{-1} Ga + X A`,
    `dB = (I - P_B) Gb (A A^T)^{-1} - B X`, X from
    `B^T B X + X A A^T = -(B^T B)^{-1} Ga A^T`; then `A -= (lr / s) dA`, `B -= (lr / s) dB`,
    so W moves by `-lr (P_B G + G P_A - P_B G P_A)`. Gram matrices get the same relative
    ``damping`` as AdaPreLoRA (B = 0 at init). Non-pair parameters use AdamW.
    """

    def __init__(self, params, lr: float = 1e-3, damping: float = 0.1, weight_decay: float = 0.0, *,
                 betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8):
        defaults = dict(lr=lr, damping=damping, weight_decay=weight_decay, betas=tuple(betas), adamw_eps=adamw_eps)
        super().__init__(params, defaults)

    @classmethod
    def from_model(cls, model: nn.Module | Sequence[nn.Module | dict[str, Any]], **kwargs) -> LoRAPro:
        return cls(cls._groups_from_model(model), **kwargs)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check(group["damping"] >= 0.0, f"damping must be >= 0, got {group['damping']!r}.")

    def _pair_state_shapes(self, m: int, n: int, r: int, group: dict[str, Any]):
        return {}

    def _update_bucket(self, w: Gathered, group: dict[str, Any], prepared: dict[str, Any]) -> None:
        s = w.bucket.scales()[:, None, None]
        dA, dB = lorapro_step(w.A, w.B, w.grad_A / s, w.grad_B / s, damping=group["damping"])
        self._advance(w)
        neg_lr_over_s = -group["lr"] / s
        decay = 1.0 - group["lr"] * group["weight_decay"]
        self._apply_delta(w.bucket.As, dA * neg_lr_over_s, w.active, decay)
        self._apply_delta(w.bucket.Bs, dB * neg_lr_over_s, w.active, decay)
