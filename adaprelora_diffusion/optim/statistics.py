"""Row/column sums of `G * G` for LoRA layers, gathered by forward and backward hooks.

The AdaPreLoRA update itself needs only the factor gradients, but Adafactor's statistics need
the row and column sums of the squared full gradient `G = dL/dW`, which autograd never forms.
For a layer with (post-dropout) input X (T x n) and output gradient D (T x m), `G = D^T X`.
A forward hook on `lora_A` notes X, a forward hook on `lora_B` wraps its output in an identity
autograd function that saves X and the lora_A output (tensors autograd keeps anyway, and that
gradient checkpointing recomputes), and that function's backward reduces G, or a Gaussian sketch
of it, to m + n numbers while the backward pass runs.

- "exact": form G one layer at a time (one extra matmul per layer), reduce, free.
- "sketch": `rows ~ ||(G S1)_i||^2`, `cols ~ ||(S2^T G)_:,j||^2` with Gaussian S1 (n x k),
  S2 (m x k), entries N(0, 1/k), fresh each step: unbiased, O(T (m + n) k). The hooks add up
  the linear sketches `G S1 = D^T (X S1)` and `S2^T G = (D S2)^T X`, and the squares are taken
  at step time. S1 and S2 depend only on (seed, step, layer), so every micro-batch and every
  data-parallel rank sketches with the same matrices: summing over micro-batches and averaging
  over ranks first makes the statistic that of the gradient actually applied, exactly.

The hooks see the gradient before anything rescales it (a GradScaler's unscale, gradient
clipping, DDP averaging). So each hook also accumulates `grad_z^T h`, exactly what autograd
adds to `lora_B.weight.grad`; comparing it with the gradient the optimizer finally receives
gives the factor by which the statistics must be rescaled (see `AdaPreLoRA._fresh_statistics`).

"exact" cannot sum G over backward passes without an m x n buffer per layer, so several
backward passes before one step (gradient accumulation) are combined as `count * sum_i G_i^2`
(equal to `G^2` when the micro-batch gradients agree, Adafactor's `E[g^2]` otherwise), and
data-parallel ranks average their squares.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_weight

from .pairs import LoraPair

__all__ = ["HookStatistics", "STATS_MODES"]

STATS_MODES = ("exact", "sketch", "tangent")


class _StatisticsTap(torch.autograd.Function):
    """Identity on a lora_B output; its backward hands the layer input x, the lora_A output h and
    the output gradient to the statistics.

    x and h are saved through autograd rather than held by a hook's closure, so gradient
    checkpointing frees and recomputes them like any saved activation (a closure kept every LoRA
    layer's input alive from forward to backward, which undid non-reentrant checkpointing). Without
    checkpointing they are the tensors lora_A and lora_B save anyway: no extra memory.
    """

    @staticmethod
    def forward(ctx, z: Tensor, x: Tensor, h: Tensor, accumulate) -> Tensor:
        ctx.save_for_backward(x, h)
        ctx.accumulate = accumulate
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        x, h = ctx.saved_tensors
        ctx.accumulate(x, h, grad_z)
        return grad_z, None, None, None


class HookStatistics:
    """Installs the hooks for groups of same-shape pairs and holds what they gathered since the last step.

    For each group (the optimizer's buckets), `buffers[g]` is `None` or `[a, b, ref, count]`,
    stacked over the group's pairs so the optimizer uses them without copying: with "exact",
    `a`, `b` are the row (k, m) and column (k, n) sums of `G * G`; with "sketch" they are
    `G S1` (k, m, s) and `S2^T G` (k, s, n); `ref` is (k, m, r) and `count` (k,) counts backward
    passes. At least float32, allocated at the first backward after a reset and dropped by
    `reset()`, so they live only as long as gradients do. `step` numbers the sketches.
    """

    def __init__(self, groups: list[list[LoraPair]], mode: str, sketch_dim: int = 16, seed: int = 0):
        if mode not in ("exact", "sketch"):
            raise ValueError(f"HookStatistics needs mode 'exact' or 'sketch', got {mode!r}.")
        self.groups = [list(g) for g in groups]
        self.pairs = [pair for g in self.groups for pair in g]
        self._slot = [(gi, i) for gi, g in enumerate(self.groups) for i in range(len(g))]
        self.mode = mode
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.buffers: list[list | None] = [None] * len(self.groups)
        # Backward passes each pair's hook saw since the last reset, counted in Python as well, so
        # "did every hook fire?" needs no device sync (see `silent`).
        self.fired = [0] * len(self.pairs)
        self.step = 0
        self._sketches: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}
        self._handles = []
        for index, pair in enumerate(self.pairs):
            self._install(index, pair)

    @property
    def fresh(self) -> list[list | None]:
        """Per pair: `[a, b, ref, count]` views of the group buffers, or None if not seen."""
        out: list[list | None] = []
        for gi, i in self._slot:
            buf = self.buffers[gi]
            count = 0 if buf is None else int(buf[3][i])
            out.append(None if count == 0 else [buf[0][i], buf[1][i], buf[2][i], count])
        return out

    def _group_buffers(self, gi: int, like: Tensor) -> list:
        if self.buffers[gi] is None:
            m, n, r = self.groups[gi][0].shape
            k, s = len(self.groups[gi]), self.sketch_dim
            shapes = ((m,), (n,)) if self.mode == "exact" else ((m, s), (s, n))
            opts = dict(dtype=like.dtype, device=like.device)
            self.buffers[gi] = [torch.zeros(k, *shapes[0], **opts), torch.zeros(k, *shapes[1], **opts),
                                torch.zeros(k, m, r, **opts), torch.zeros(k, **opts)]
        return self.buffers[gi]

    # -- hooks ---------------------------------------------------------------------------
    def _install(self, index: int, pair: LoraPair) -> None:
        a_mod = pair.module.lora_A[pair.adapter]
        b_mod = pair.module.lora_B[pair.adapter]
        slot: dict[str, Tensor] = {}

        def keep_input(module, args, output):
            if torch.is_grad_enabled():
                slot["x"] = args[0]

        def attach(module, args, output):
            x = slot.pop("x", None)
            if x is None or not (torch.is_grad_enabled() and output.requires_grad):
                return None
            return _StatisticsTap.apply(output, x, args[0], partial(self._accumulate, index))

        self._handles.append(a_mod.register_forward_hook(keep_input))
        self._handles.append(b_mod.register_forward_hook(attach))

    def sketch_matrices(self, index: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """S1 (n x k) and S2 (m x k) of pair `index` for the current step, entries N(0, 1/k).

        Shared by the pairs of one group (same shape): each pair's estimate stays unbiased, and
        one draw per shape instead of one per layer keeps the Gaussian sampling, which cost about
        as much as the sketches themselves, out of backward. Drawn from a generator seeded by
        (seed, step, group) alone, so they are the same on every rank and for every micro-batch
        of a step, and a resumed run draws the same ones.
        """
        gi = self._slot[index][0]
        key = (gi, like.dtype)
        if key not in self._sketches:
            m, n, _ = self.pairs[index].shape
            k = self.sketch_dim
            gen = torch.Generator(device=like.device)
            gen.manual_seed((self.seed * 1_000_003 + self.step) * 10_007 + gi)
            draw = torch.randn(n + m, k, generator=gen, device=like.device, dtype=like.dtype).mul_(1.0 / math.sqrt(k))
            self._sketches[key] = (draw[:n], draw[n:])
        return self._sketches[key]

    @torch.no_grad()
    def _accumulate(self, index: int, x: Tensor, h: Tensor, grad_z: Tensor | None) -> None:
        if grad_z is None:  # the output reached no loss (DDP's find_unused_parameters hands such hooks None)
            return
        pair = self.pairs[index]
        m, n, r = pair.shape
        dtype = torch.promote_types(grad_z.dtype, torch.float32)  # at least float32, float64 stays
        x, h, grad_z = x.to(dtype), h.to(dtype), grad_z.to(dtype)
        if pair.kind == "linear":
            ref = grad_z.reshape(-1, m).T @ h.reshape(-1, r)
            rows, cols = self._linear_sums(index, x.reshape(-1, n), grad_z.reshape(-1, m) / pair.scaling)
        else:
            ref = torch.einsum("bmhw,brhw->mr", grad_z, h)
            rows, cols = self._conv_sums(index, pair, x, grad_z / pair.scaling)
        gi, i = self._slot[index]
        buf = self._group_buffers(gi, ref)
        buf[0][i].add_(rows)
        buf[1][i].add_(cols)
        buf[2][i].add_(ref)
        buf[3][i] += 1
        self.fired[index] += 1

    def _linear_sums(self, index: int, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Exact: row/col sums of G^2. Sketch: G S1 and S2^T G, still linear in G."""
        if self.mode == "exact":
            g2 = (d.T @ x).square_()
            return g2.sum(1), g2.sum(0)
        s1, s2 = self.sketch_matrices(index, x)
        return d.T @ (x @ s1), (d @ s2).T @ x

    def _conv_sums(self, index: int, pair: LoraPair, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        conv = pair.module.lora_A[pair.adapter]
        m, n, _ = pair.shape
        kernel = (x.shape[1], *conv.kernel_size)
        geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        if self.mode == "exact":
            g2 = conv2d_weight(x, (m, *kernel), d, **geometry).reshape(m, n).square_()
            return g2.sum(1), g2.sum(0)
        k = self.sketch_dim
        s1, s2 = self.sketch_matrices(index, x)
        # X S1 for every patch is a convolution with k output channels; S2^T G is the weight
        # gradient of a k-output convolution whose output gradient is D S2.
        xs1 = F.conv2d(x, s1.T.reshape(k, *kernel), **geometry)
        gs1 = torch.einsum("bmhw,bkhw->mk", d, xs1)
        ds2 = torch.einsum("bmhw,mk->bkhw", d, s2)
        s2g = conv2d_weight(x, (k, *kernel), ds2, **geometry).reshape(k, n)
        return gs1, s2g

    def row_col_sums(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Turn stacked accumulated buffers into row and column sums of `G * G` (estimates)."""
        if self.mode == "exact":
            return a, b
        return torch.linalg.vecdot(a, a, dim=-1), torch.linalg.vecdot(b, b, dim=-2)  # one read, no temporary

    # -- life cycle ----------------------------------------------------------------------
    def silent(self) -> list[int]:
        """Indices of the pairs whose hooks saw no backward pass since the last reset."""
        return [i for i, n in enumerate(self.fired) if n == 0]

    def reset(self) -> None:
        self.buffers = [None] * len(self.groups)
        self.fired = [0] * len(self.pairs)
        self._sketches.clear()

    def advance(self) -> None:
        """Start the next step: drop the buffers and draw new sketch matrices."""
        self.reset()
        self.step += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    @property
    def installed(self) -> bool:
        return bool(self._handles)
