"""Find the (lora_A, lora_B) pairs of peft LoRA layers, by module, never by parameter order.

peft keeps each adapter's factors as `layer.lora_A[adapter]` / `layer.lora_B[adapter]` on the
same `LoraLayer`, with the scale in `layer.scaling[adapter]` (alpha / r, or alpha / sqrt(r)
with rsLoRA). Reading all three from the layer object is what makes the pairing robust to
parameter order, tied modules and several adapters.

peft's LoRA layers over bitsandbytes' 4-bit and 8-bit Linear (QLoRA) pair too: their LoRA path is
the same `lora_B(lora_A(x)) * scaling` added to the base layer's output, so `s * B @ A` is the
update of the (dequantized) weight and the closed form applies unchanged. bitsandbytes is
optional, so those classes are looked up only once peft has imported them.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.lora import layer as lora_layer
from torch import nn

__all__ = ["LoraPair", "find_lora_pairs"]


@dataclass(eq=False)
class LoraPair:
    """One LoRA module seen as the matrix product `s * B @ A` (conv kernels flattened)."""

    name: str
    module: nn.Module
    adapter: str
    A: nn.Parameter
    B: nn.Parameter

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module.lora_A[self.adapter], nn.Conv2d) else "linear"

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(m, n, r)`: out features, flattened in features, rank."""
        r = self.A.shape[0]
        return self.B.shape[0], self.A[0].numel(), r

    def a_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """View a tensor shaped like A (r, n) or (r, C, kh, kw) as the r x n matrix."""
        return t.reshape(t.shape[0], -1)

    def b_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """View a tensor shaped like B (m, r) or (m, r, 1, 1) as the m x r matrix."""
        return t.reshape(t.shape[0], -1)


def _quantized_linear_types() -> tuple[type, ...]:
    """peft's LoRA layers over bitsandbytes' Linear4bit / Linear8bitLt, if peft has loaded them.

    A model holding such layers was built through ``peft.tuners.lora.bnb``, so it is in
    ``sys.modules``; looking it up there never imports bitsandbytes for a model without them."""
    module = sys.modules.get("peft.tuners.lora.bnb")
    return tuple(t for t in (getattr(module, "Linear4bit", None), getattr(module, "Linear8bitLt", None)) if t is not None)


def _pairable(module: nn.Module, adapter: str) -> str | None:
    """Why this adapter of this layer cannot be treated as a plain `B @ A` pair, or None."""
    if adapter in getattr(module, "lora_variant", {}):
        # DoRA and other variants change the forward map, so the closed form's J is not theirs.
        return f"LoRA variant {type(module.lora_variant[adapter]).__name__}"
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    if isinstance(module, (lora_layer.Linear, *_quantized_linear_types())) and isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        return None
    if isinstance(module, lora_layer.Conv2d) and isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d):
        if b.groups != 1 or a.groups != 1 or b.kernel_size != (1, 1):
            return "grouped convolution"
        return None
    return f"layer type {type(module).__name__}"


def find_lora_pairs(model: nn.Module) -> tuple[list[LoraPair], list[tuple[str, nn.Parameter]]]:
    """Split the trainable parameters of `model` into LoRA pairs and everything else.

    Returns `(pairs, others)`. `others` holds every trainable parameter that is not the weight
    of a pairable lora_A/lora_B (biases, heads, embeddings, DoRA magnitudes, LoRA factors of
    layer types the closed form does not cover); the optimizer trains them with AdamW, so
    nothing trainable is silently dropped. Each parameter appears once even if tied.
    """
    pairs: list[LoraPair] = []
    paired: set[int] = set()
    skipped: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer.LoraLayer) or not hasattr(module, "lora_A"):
            continue
        for adapter in module.lora_A.keys():
            if adapter not in module.lora_B:
                continue
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if not (A.requires_grad and B.requires_grad) or id(A) in paired:
                continue
            reason = _pairable(module, adapter)
            if reason is not None:
                skipped.setdefault(reason, []).append(name)
                continue
            pairs.append(LoraPair(name=name, module=module, adapter=adapter, A=A, B=B))
            paired.update((id(A), id(B)))
    if skipped:
        detail = "; ".join(f"{why}: {len(names)} (e.g. {names[0]})" for why, names in skipped.items())
        warnings.warn(
            f"Some LoRA factors are not plain B @ A pairs and are trained with AdamW instead: {detail}.",
            stacklevel=2,
        )
    others: list[tuple[str, nn.Parameter]] = []
    seen = set(paired)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            others.append((name, p))
            seen.add(id(p))
    return pairs, others
