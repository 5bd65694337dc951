"""A diagnostic optimizer for the version 3 ablation: one step's direction from one rule, its length from another.

Grafting (Agarwal et al., "Disentangling adaptive gradient methods from learning rates", 2020)
takes the direction of optimizer D's step and the norm of optimizer M's step. Here both are
computed inside one batched optimizer with its own statistics (not by running two optimizers):

- ``"adaprelora"``: version 2's parameter steps (the H-projected W-step mapped to the factors);
- ``"adafactor"``: Adafactor on each factor, momentum-free, decay ``1 - t^-0.8``, update RMS
  clipped at 1, at a fixed lr (``relative=False``, as transformers' Adafactor with
  ``relative_step=False, scale_parameter=False``) or relative to the factor's RMS with the step
  capped at ``1/sqrt(t)`` (``relative=True``, torch.optim.Adafactor's rule);
- ``norm="min"``: version 2's step, each part shortened to Adafactor's length where that is
  shorter.

``granularity`` says what is rescaled: each rank component (row of A, column of B) or each
factor as a whole. ``trust_ratio`` (the product's own setting) then limits A's step.
It lives with the benchmarks, not in the product: it exists to say which half of Adafactor's
rule carries its lead (docs/optimizer.md, "Version 3").
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaprelora_diffusion.optim import AdaPreLoRA
from adaprelora_diffusion.optim.closed_form import factored_step

__all__ = ["GraftedAdaPreLoRA"]

_TINY = 1e-30


def adafactor_update(grad: Tensor, row: Tensor, col: Tensor, weight: Tensor, eps: float = 1e-30) -> Tensor:
    """Adafactor's clipped update of a stack (k, a, b); updates the row (k, a) and column (k, b) EMAs in place."""
    square = grad.square() + eps
    row.lerp_(square.mean(-1), weight)
    col.lerp_(square.mean(-2), weight)
    # r_factor * c_factor as transformers computes it: never forms the (underflowing) product of two EMAs
    update = grad * (row / row.mean(-1, keepdim=True)).rsqrt()[:, :, None] * col.rsqrt()[:, None, :]
    rms = update.square().mean((-2, -1)).sqrt()
    return update / rms.clamp_min(1.0)[:, None, None]


class GraftedAdaPreLoRA(AdaPreLoRA):
    """AdaPreLoRA whose step takes its direction and its length from version 2's rule or Adafactor's."""

    def __init__(self, params, direction: str = "adaprelora", norm: str = "adafactor", granularity: str = "component",
                 relative: bool = False, **kwargs):
        if direction not in ("adaprelora", "adafactor") or norm not in ("adaprelora", "adafactor", "min"):
            raise ValueError(f"direction must be adaprelora or adafactor and norm adaprelora, adafactor or min, "
                             f"got {direction!r}, {norm!r}.")
        if granularity not in ("component", "factor"):
            raise ValueError(f"granularity must be component or factor, got {granularity!r}.")
        self.direction, self.norm, self.granularity, self.relative = direction, norm, granularity, relative
        kwargs.setdefault("step_bound", None)  # the graft replaces version 3's bound
        kwargs.setdefault("trust_ratio", None)
        super().__init__(params, **kwargs)

    def _pair_state_shapes(self, m, n, r, group):
        shapes = super()._pair_state_shapes(m, n, r, group)
        shapes.update({"af_row_A": ("A", (r,)), "af_col_A": ("A", (n,)), "af_row_B": ("B", (m,)), "af_col_B": ("B", (r,))})
        return shapes

    def _norms(self, step_A: Tensor, step_B: Tensor) -> tuple[Tensor, Tensor]:
        if self.granularity == "component":
            return step_A.norm(dim=-1, keepdim=True), step_B.norm(dim=-2, keepdim=True)
        return step_A.flatten(1).norm(dim=-1)[:, None, None], step_B.flatten(1).norm(dim=-1)[:, None, None]

    def _update_bucket(self, w, group, prepared):
        bucket, state = w.bucket, w.bucket.state
        step = self._advance(w)
        d1, d2 = self._preconditioner(w, group, prepared, step)
        A, B = w.A, w.B
        inv_s = bucket.scales().reciprocal()
        lr = group["lr"]
        a_norm = A.flatten(1).norm(dim=-1)
        P, Ra, Rb, Q = factored_step(A, B, w.grad_A, w.grad_B, d1, d2, shared_core=True,
                                     balance=group["balance"], damping=group["damping"])
        coef = -(lr * inv_s * inv_s)[:, None, None]  # raw gradients: A <- A - (lr / s) dA(Ga), Ga = A.grad / s
        v2_A, v2_B = coef * torch.bmm(P, Ra), coef * torch.bmm(Rb, Q)
        weight = step.clamp_min(1.0).pow(-0.8)[:, None]
        U_A = adafactor_update(w.grad_A, state["af_row_A"], state["af_col_A"], weight)
        U_B = adafactor_update(w.grad_B, state["af_row_B"], state["af_col_B"], weight)
        if self.relative:  # torch.optim.Adafactor: lr relative to the factor's RMS (floor 1e-3), capped at 1/sqrt(t)
            rate = torch.minimum(torch.full_like(step, lr), step.clamp_min(1.0).rsqrt())[:, None, None]
            af_A = -rate * A.square().mean((-2, -1)).sqrt().clamp_min(1e-3)[:, None, None] * U_A
            af_B = -rate * B.square().mean((-2, -1)).sqrt().clamp_min(1e-3)[:, None, None] * U_B
        else:
            af_A, af_B = -lr * U_A, -lr * U_B
        dir_A, dir_B = (v2_A, v2_B) if self.direction == "adaprelora" else (af_A, af_B)
        if self.norm == "adaprelora" and self.direction == "adaprelora":
            delta_A, delta_B = v2_A, v2_B
        elif self.norm == "adafactor" and self.direction == "adafactor":
            delta_A, delta_B = af_A, af_B
        else:
            have_A, have_B = self._norms(dir_A, dir_B)
            if self.norm == "min":
                want_A, want_B = (torch.minimum(x, y) for x, y in zip(self._norms(v2_A, v2_B), self._norms(af_A, af_B)))
            else:
                want_A, want_B = self._norms(*((v2_A, v2_B) if self.norm == "adaprelora" else (af_A, af_B)))
            delta_A = dir_A * (want_A / have_A.clamp_min(_TINY))
            delta_B = dir_B * (want_B / have_B.clamp_min(_TINY))
        if group["trust_ratio"] is not None:
            limit = group["trust_ratio"] * a_norm
            total = delta_A.flatten(1).norm(dim=-1)
            shrink = torch.where(limit > 0, (limit / total.clamp_min(_TINY)).clamp_max(1.0), torch.ones_like(total))
            delta_A = delta_A * shrink[:, None, None]
        decay = 1.0 - lr * group["weight_decay"]
        self._apply_delta(bucket.As, delta_A, w.active, decay)
        self._apply_delta(bucket.Bs, delta_B, w.active, decay)
