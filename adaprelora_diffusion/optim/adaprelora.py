"""AdaPreLoRA: Adafactor's preconditioner on the weight matrix, mapped back to the LoRA factors."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import Gathered, LoraPairOptimizer, _check
from .closed_form import adafactor_scales, factored_step, h_step_rms, step_bound_scales, tangent_statistics
from .statistics import STATS_MODES, HookStatistics

_TINY = 1e-30

__all__ = ["AdaPreLoRA", "DEFAULT_STATS", "MOMENTUM_CHOICES", "STATS_CHOICES"]

# Chosen by benchmarks/optimizer_quality.py: sketch ties exact on T1-T3 at half of exact's
# backward cost and stays exact under accumulation and DDP; tangent loses on T3. The figures are
# in benchmarks/results/optimizer_quality.md (and results/t2_fine_grid).
DEFAULT_STATS = "sketch"
STATS_CHOICES = STATS_MODES
MOMENTUM_CHOICES = ("gradient", "update")


class AdaPreLoRA(LoraPairOptimizer):
    r"""LoRA optimizer that preconditions with Adafactor's statistics on W = W0 + s B A.

    For each LoRA module with W-space factor gradients `Ga = A.grad / s = B^T G` and
    `Gb = B.grad / s = G A^T`, Adafactor's factored second moment of `G = dL/dW`
    (EMAs `R`, `C` of the row and column sums of `G * G + eps`) defines the diagonal
    Kronecker metric `H(Z) = diag(d1) Z diag(d2)`, `d1_i d2_j = sqrt(R_i C_j / sum R)`.
    The step is the solution of `J* H J d = J* G`, `J(dA, dB) = B dA + dB A`, that gives the
    share ``balance`` (c) of the common part to A's step:

    .. math::
        K_B = B^T D_1 B + \delta I,\quad K_A = A D_2 A^T + \delta I \\
        dA = K_B^{-1} [G_a / d_2 - (1 - c)(G_a A^T) K_A^{-1} A] \\
        dB = [G_b / d_1 - c B K_B^{-1} (B^T G_b)] K_A^{-1} \\
        \Delta A = -(lr / s)\, dA,\qquad \Delta B = -(lr / s)\, dB

    so W moves by `-lr (B dA + dB A)`, the H-projection of Adafactor's direction onto the LoRA
    tangent space, and ``lr`` means what Adam's lr means on W (version 2's rule).
    ``delta = damping * (tr K_B + tr K_A) / (2 r)``. The W-step is clipped to ``clip_threshold``
    in its sqrt(V)-weighted RMS, `sqrt(<G, Z> / sum sqrt(V))` (see `closed_form.h_step_rms`).

    Version 3 bounds that step in factor space, where it can overshoot while B is small (A's
    step grows like `1 / |B|`). With rank component i = row `a_i` of A and column `b_i` of B:

    .. math::
        \|\Delta a_i\| \le \beta\, lr \sqrt{n},\qquad \|\Delta b_i\| \le \beta\, (lr / s) \sqrt{m},
        \qquad \|\Delta A\|_F \le \rho \|A\|_F

    each component keeping its direction (``step_bound`` β: no component moves farther than one
    Adam step, whose entries have RMS lr, would move it; ``trust_ratio`` ρ: A changes by at most
    that fraction per step). The bounds only shorten a step; in the long run the W-step rule
    is version 2's. See docs/optimizer.md for the evidence behind every default.

    The default is momentum-free (``betas[0] = 0``): state per module is the m + n statistics.
    With ``betas[0] > 0`` a momentum of the factor gradients is used in the solve
    (``momentum="gradient"``) or of the solved directions (``momentum="update"``), and
    (m + n) r more floats are kept.

    ``stats`` chooses where R and C come from: ``"exact"`` (hooks form G per layer in
    backward), ``"sketch"`` (hooks, unbiased Gaussian sketch, LoRA-sized cost, exact under
    gradient accumulation and data parallelism because it is linear in G) or
    ``"tangent"`` (no hooks: the projection of G onto the tangent space, from Ga and Gb).
    Hook modes install hooks in the model; `close()` (or leaving a ``with`` block) removes
    them.

    Trainable parameters that are not LoRA pairs (biases, heads, embeddings, DoRA
    magnitudes, LoRA factors of layer types the closed form does not cover) are trained
    with AdamW (``adamw_betas``, ``weight_decay``, ``adamw_eps``) inside this optimizer.

    A step whose gradients or statistics contain inf/NaN is skipped: parameters and state
    stay unchanged, ``skipped_steps`` counts it and a RuntimeWarning says so.

    Build it with :meth:`from_model`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-30,
        damping: float = 0.1,
        balance: float = 0.5,
        clip_threshold: float | None = 1.0,
        weight_decay: float = 0.0,
        *,
        beta2_decay: float | None = None,
        scale_parameter: bool = False,
        stats: str = DEFAULT_STATS,
        momentum: str = "gradient",
        step_bound: float | None = 1.0,
        trust_ratio: float | None = 0.1,
        sketch_dim: int = 16,
        seed: int = 0,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
    ):
        _check(stats in STATS_MODES, f"stats must be one of {STATS_MODES}, got {stats!r}.")
        _check(isinstance(sketch_dim, int) and sketch_dim >= 1, f"sketch_dim must be an int >= 1, got {sketch_dim!r}.")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            damping=damping,
            balance=balance,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            beta2_decay=beta2_decay,
            scale_parameter=scale_parameter,
            momentum=momentum,
            step_bound=step_bound,
            trust_ratio=trust_ratio,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )
        self.stats = stats
        self._hooks: HookStatistics | None = None
        super().__init__(params, defaults)
        if stats != "tangent":
            self._hooks = HookStatistics([b.pairs for b in self._buckets], stats, sketch_dim=sketch_dim, seed=seed)

    @classmethod
    def from_model(cls, model: nn.Module | Sequence[nn.Module | dict[str, Any]], **kwargs) -> AdaPreLoRA:
        """Build the optimizer over every trainable parameter of `model`.

        `model` is a module, or a list of modules or of dicts ``{"model": m, "lr": ...}``
        giving per-model overrides (e.g. a lower lr for the text encoder). LoRA pairs are
        found by module (see `find_lora_pairs`); everything else trainable goes to AdamW.
        """
        return cls(cls._groups_from_model(model), **kwargs)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not group["lora"]:
            return
        _check(group["eps"] > 0.0 and math.isfinite(group["eps"]), f"eps must be a finite number > 0, got {group['eps']!r}.")
        _check(group["damping"] >= 0.0 and math.isfinite(group["damping"]), f"damping must be >= 0, got {group['damping']!r}.")
        _check(0.0 <= group["balance"] <= 1.0, f"balance must be in [0, 1], got {group['balance']!r}.")
        clip = group["clip_threshold"]
        _check(clip is None or clip > 0.0, f"clip_threshold must be > 0 or None (no clipping), got {clip!r}.")
        _check(
            group["momentum"] in MOMENTUM_CHOICES,
            f"momentum must be 'gradient' or 'update', got {group['momentum']!r}.",
        )
        for key in ("step_bound", "trust_ratio"):
            value = group[key]
            _check(value is None or (isinstance(value, (int, float)) and 0.0 < value < math.inf),
                   f"{key} must be a number > 0 or None (off), got {value!r}.")
        decay = group["beta2_decay"]
        _check(
            decay is None or (isinstance(decay, (int, float)) and -1.0 <= decay < 0.0),
            f"beta2_decay must be None (fixed betas[1]) or in [-1, 0) (Adafactor's -0.8), got {decay!r}.",
        )

    def _pair_state_shapes(self, m: int, n: int, r: int, group: dict[str, Any]):
        """Statistics (m + n floats per pair); momenta ((m + n) r) only when ``betas[0] > 0``."""
        shapes = {"col_stats": ("A", (n,)), "row_stats": ("B", (m,))}
        if group["betas"][0] > 0.0:
            shapes.update({"exp_avg_A": ("A", (r, n)), "exp_avg_B": ("B", (m, r))})
        return shapes

    # -- hooks' life cycle ---------------------------------------------------------------
    def close(self) -> None:
        """Remove the statistics hooks from the model (idempotent)."""
        if self._hooks is not None:
            self._hooks.remove()

    def __enter__(self) -> AdaPreLoRA:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._hooks is not None:
            self._hooks.reset()

    def _on_step_end(self) -> None:
        if self._hooks is not None:
            self._hooks.advance()

    def _extra_state(self) -> dict[str, Any]:
        return {"sketch_step": self._hooks.step if self._hooks is not None else 0}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self._hooks is not None:
            self._hooks.step = int(extra.get("sketch_step", 0))

    # -- statistics ----------------------------------------------------------------------
    def _prepare(self, work: list[Gathered]) -> dict[str, Any]:
        """Fresh row/column statistics of every bucket, rescaled to the gradient step() sees."""
        if self._hooks is None or not work:
            return {}
        _check(
            self._hooks.installed,
            f"AdaPreLoRA(stats={self.stats!r}) was closed: its hooks are removed, so it has no statistics. "
            "Build a new optimizer, or use stats='tangent' which needs no hooks.",
        )
        if self._hooks_bypassed(work):
            return {}
        hooks = self._hooks
        per_bucket = []
        for w in work:
            buf = hooks.buffers[w.bucket.index]
            if buf is None:  # no layer of this bucket ran forward this step: no information
                buf = hooks._group_buffers(w.bucket.index, w.A)
            per_bucket.append([t.to(w.bucket.dtype) for t in buf])
        self._all_reduce(per_bucket)
        # Ratio of the gradient step() receives to the one the hooks saw (1 unless a GradScaler
        # unscaled, or clipping rescaled, the gradients in between): one global least-squares
        # fit of B.grad ~ rho * (grad_z^T h), over every hooked pair.
        num = sum(torch.linalg.vecdot(w.grad_B.flatten(), b[2].flatten()) for w, b in zip(work, per_bucket))
        den = sum(torch.linalg.vecdot(b[2].flatten(), b[2].flatten()) for b in per_bucket)
        rho = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
        prepared: dict[str, Any] = {"rho": rho}
        for w, (a, b, _, counts) in zip(work, per_bucket):
            rows, cols = hooks.row_col_sums(a, b)
            # Sketches were summed linearly over backward passes; exact squares were not (see
            # statistics.py), so they carry the count of backward passes.
            factor = rho.to(rows.dtype).square() * (counts if hooks.mode == "exact" else torch.ones_like(counts))
            prepared[f"rows{id(w.bucket)}"] = rows * factor[:, None]
            prepared[f"cols{id(w.bucket)}"] = cols * factor[:, None]
        return prepared

    def _hooks_bypassed(self, work: list[Gathered]) -> bool:
        """True, after a warning and a switch to ``stats="tangent"``, when some LoRA layer has a gradient
        but its hooks never fired: something (a fused LoRA kernel, a custom forward) computed it without
        calling the lora_A/lora_B modules, so its statistics would be empty. A layer that did not run
        at all has a zero gradient and is not counted."""
        silent = set(self._hooks.silent())
        if not silent:
            return False
        index = {id(pair): i for i, pair in enumerate(self._hooks.pairs)}
        suspects, grads = [], []
        for w in work:
            for k, pair in enumerate(w.bucket.pairs):
                if index[id(pair)] in silent:
                    suspects.append(pair.name)
                    grads.append(w.grad_A[k].abs().sum() + w.grad_B[k].abs().sum())
        if not suspects:
            return False
        with_grad = torch.stack(grads).ne(0).tolist()  # one sync, only when some hook stayed silent
        bypassed = [name for name, g in zip(suspects, with_grad) if g]
        if not bypassed:
            return False
        warnings.warn(
            f"AdaPreLoRA(stats={self.stats!r}): the statistics hooks of {len(bypassed)} LoRA layer(s) never fired "
            f"although they have gradients (e.g. {bypassed[0]!r}): something computes them without calling the "
            "lora_A/lora_B modules (a fused LoRA kernel or a custom forward). Switching to stats='tangent', which "
            "needs no hooks; to keep hook statistics, train with the layers' plain peft forward.",
            RuntimeWarning,
            stacklevel=4,
        )
        self._hooks.remove()
        self._hooks = None
        self.stats = "tangent"
        return True

    @staticmethod
    def _all_reduce(per_bucket: list[list[Tensor]]) -> None:
        """Average the hook buffers over data-parallel ranks, so every rank steps alike.

        For "sketch" the buffers are linear in G, so this gives the sketch of the averaged
        gradient exactly; for "exact" it averages the ranks' squares.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = [t.reshape(-1).float() for b in per_bucket for t in b]
        joined = torch.cat(flat)
        dist.all_reduce(joined)
        joined /= dist.get_world_size()
        offset = 0
        for b in per_bucket:
            for j, t in enumerate(b):
                size = t.numel()
                b[j] = joined[offset : offset + size].view(t.shape).to(t.dtype)
                offset += size

    # -- the update ----------------------------------------------------------------------
    def _preconditioner(self, w: Gathered, group: dict[str, Any], prepared: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        """Update the statistics' EMAs with this step's row/column sums; return H's `d1`, `d2`.

        Fixed decay: `beta2 = betas[1]`, with Adam's bias correction. Adafactor's schedule
        (``beta2_decay``): `beta2_t = 1 - t^beta2_decay`, which starts at 0 (the first step
        sees exactly its own statistics) and needs no bias correction.
        """
        bucket, state, active = w.bucket, w.bucket.state, w.active
        m, n, _ = bucket.shape
        if self._hooks is None:
            inv_s = bucket.scales().reciprocal()[:, None, None]
            rows, cols = tangent_statistics(w.A, w.B, w.grad_A * inv_s, w.grad_B * inv_s)
        else:
            rows, cols = prepared[f"rows{id(bucket)}"], prepared[f"cols{id(bucket)}"]
        eps, decay = group["eps"], group["beta2_decay"]
        if decay is None:
            beta2 = group["betas"][1]
            weight: float | Tensor = 1.0 - beta2
        else:
            weight = step.clamp_min(1.0).pow(decay)[:, None]
        row_ema = self._masked(active, torch.lerp(state["row_stats"], rows + n * eps, weight), state["row_stats"])
        col_ema = self._masked(active, torch.lerp(state["col_stats"], cols + m * eps, weight), state["col_stats"])
        state["row_stats"].copy_(row_ema)
        state["col_stats"].copy_(col_ema)
        if decay is None:
            bias2 = (1.0 - beta2 ** step.clamp_min(1.0))[:, None]
            row_ema, col_ema = row_ema / bias2, col_ema / bias2
        return adafactor_scales(row_ema, col_ema)

    def _update_bucket(self, w: Gathered, group: dict[str, Any], prepared: dict[str, Any]) -> None:
        bucket, active = w.bucket, w.active
        beta1 = group["betas"][0]
        trust = group["trust_ratio"]
        # before the solve's products overwrite the gathered A with its step
        trust_limit = trust * torch.linalg.vector_norm(w.A.flatten(1), dim=-1) if trust is not None else None
        if beta1 > 0.0 and "exp_avg_A" not in bucket.state:  # momentum switched on after construction
            self._grow_state(bucket)
        state = bucket.state
        step = self._advance(w)
        d1, d2 = self._preconditioner(w, group, prepared, step)
        A, B = w.A, w.B
        inv_s = bucket.scales().reciprocal()
        lr = group["lr"] * (self._weight_rms(bucket) if group["scale_parameter"] else 1.0)
        clip = group["clip_threshold"]
        solve = dict(balance=group["balance"], damping=group["damping"])
        decay = 1.0 - group["lr"] * group["weight_decay"]
        # The solve runs on raw factor gradients (or their momenta): it is linear in them, so
        # 1/s (Ga = A.grad / s) and the bias correction become one per-module scale `g` applied
        # once, instead of passes over factor-sized tensors.
        if beta1 == 0.0 or group["momentum"] == "gradient":
            Ga = self._ema_scaled(state.get("exp_avg_A"), w.grad_A, None, beta1, active)
            Gb = self._ema_scaled(state.get("exp_avg_B"), w.grad_B, None, beta1, active)
            g = inv_s / (1.0 - beta1 ** step.clamp_min(1.0)) if beta1 > 0.0 else inv_s
            P, Ra, Rb, Q = factored_step(A, B, Ga, Gb, d1, d2, shared_core=beta1 == 0.0, **solve)
            # A <- A - (lr / s) * g * dA, and the same for B: the factor goes into the r x r P and
            # Q, so the products give the final parameter deltas directly.
            coef = lr * inv_s * g
            neg = -coef[:, None, None]
            # into the gathered stacks of A and B, which the solve no longer needs: no new buffers
            delta_A, delta_B = torch.bmm(P * neg, Ra, out=A), torch.bmm(Rb, Q * neg, out=B)
            if clip is not None:
                unscale = torch.where(coef > 0, -g * g / coef.clamp_min(_TINY), torch.zeros_like(coef))
                factor = (h_step_rms(delta_A, delta_B, Ga, Gb, d1, d2, scale=unscale) / clip).clamp_min(1.0)
                # Clipping rarely acts: on the CPU checking costs nothing and saves two passes; on an
                # accelerator the check would be a device sync, and the multiply is cheap there.
                if delta_A.device.type != "cpu" or bool((factor > 1.0).any()):
                    shrink = factor.reciprocal()[:, None, None]
                    delta_A, delta_B = delta_A.mul_(shrink), delta_B.mul_(shrink)
        else:
            # Adafactor's placement: momentum of the (clipped) solved directions.
            P, Ra, Rb, Q = factored_step(A, B, w.grad_A, w.grad_B, d1, d2, shared_core=True, **solve)
            dA, dB = torch.bmm(P, Ra), torch.bmm(Rb, Q)
            g = inv_s
            if clip is not None:
                g = g / (h_step_rms(dA, dB, w.grad_A, w.grad_B, d1, d2) * inv_s / clip).clamp_min(1.0)
            dA = self._ema_scaled(state["exp_avg_A"], dA, g[:, None, None], beta1, active)
            dB = self._ema_scaled(state["exp_avg_B"], dB, g[:, None, None], beta1, active)
            neg = -(lr * inv_s / (1.0 - beta1 ** step.clamp_min(1.0)))[:, None, None]
            delta_A, delta_B = dA * neg, dB * neg  # dA, dB are the momenta themselves: scaled copies
        if group["step_bound"] is not None or trust_limit is not None:
            self._bound(delta_A, delta_B, group["step_bound"], lr, inv_s, trust_limit)
        self._apply_delta(bucket.As, delta_A, active, decay)
        self._apply_delta(bucket.Bs, delta_B, active, decay)

    @staticmethod
    def _bound(delta_A: Tensor, delta_B: Tensor, step_bound: float | None, lr: float | Tensor, inv_s: Tensor,
               trust_limit: Tensor | None) -> None:
        """Shorten the steps in place to version 3's bounds (see the class docstring)."""
        m, n = delta_B.shape[1], delta_A.shape[-1]
        bound_A = bound_B = None
        if step_bound is not None:
            unit = step_bound * lr * torch.ones_like(inv_s)  # lr may be a float or per module (scale_parameter)
            bound_A, bound_B = unit * math.sqrt(n), unit * inv_s * math.sqrt(m)
        scale_A, scale_B = step_bound_scales(delta_A, delta_B, bound_A, bound_B, trust_limit)
        # As with clipping: on the CPU the check is free and saves a pass when no bound acts; on an
        # accelerator it would be a device sync, and the multiplies are cheap there.
        if delta_A.device.type != "cpu" or bool((scale_A < 1.0).any()):
            delta_A.mul_(scale_A[:, :, None])
        if delta_B.device.type != "cpu" or bool((scale_B < 1.0).any()):
            delta_B.mul_(scale_B[:, None, :])

    def _weight_rms(self, bucket) -> Tensor:
        """RMS of each pair's frozen base weight W0 (k,), for ``scale_parameter`` (Adafactor's
        relative step, `lr * max(1e-3, RMS(W))`, with W0 standing in for W0 + s B A: the base
        weight is frozen, so this is computed once per bucket)."""
        if bucket._weight_rms is None:
            values = []
            for pair in bucket.pairs:
                weight = pair.module.get_base_layer().weight
                _check(
                    weight.is_floating_point() and weight.numel() == pair.shape[0] * pair.shape[1],
                    f"scale_parameter needs the floating-point base weight of {pair.name!r}, which is stored as "
                    f"{weight.dtype} with {weight.numel()} elements (a quantized layer?). Use scale_parameter=False.",
                )
                values.append(weight.detach().to(bucket.dtype).square().mean().sqrt())
            bucket._weight_rms = torch.stack(values).clamp_min(1e-3).to(bucket.dtype)
        return bucket._weight_rms

    def _ema_scaled(self, buffer: Tensor | None, value: Tensor, scale: Tensor | None, beta: float, active: Tensor | None) -> Tensor:
        """`buffer <- beta buffer + (1 - beta) scale * value` in place (masked pairs unchanged).

        With `beta = 0` there is no buffer (the momentum-free rule keeps none): `scale * value`."""
        if scale is not None:
            value = value * scale
        if beta == 0.0:
            return value
        if active is None:
            return buffer.lerp_(value, 1.0 - beta)
        buffer.copy_(self._masked(active, torch.lerp(buffer, value, 1.0 - beta), buffer))
        return buffer
