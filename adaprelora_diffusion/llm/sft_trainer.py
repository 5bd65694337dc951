"""`AdaPreLoRASFTTrainer`: TRL's `SFTTrainer` (chat templates, loss masks, packing) with the same mixin.

Kept apart from trainer.py because TRL is the optional extra ``[llm]``. On top of TRL: with
``assistant_only_loss`` and a chat template that has no ``{% generation %}`` markers and no
training template in TRL, the assistant turns are masked by rendering (chat_masks.py) instead
of stopping with TRL's "patching is not supported for this template".
"""

from __future__ import annotations

import os

import torch

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("AdaPreLoRASFTTrainer and the adaprelora-llm command need TRL: "
                      "pip install 'adaprelora-diffusion[llm]'") from err

from .chat_masks import needs_turn_masks, turn_masks
from .trainer import PAIR_OPTIMIZERS, AdaPreLoRAMixin

__all__ = ["AdaPreLoRASFTTrainer"]


def _template_in_use(args, processing_class):
    """The chat template TRL will train with: ``args.chat_template_path``'s .jinja file, else the tokenizer's."""
    path = getattr(args, "chat_template_path", None)
    if path is not None:
        if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        return None  # a model or tokenizer to clone the template from: TRL's own path
    return getattr(processing_class, "chat_template", None)


class AdaPreLoRASFTTrainer(AdaPreLoRAMixin, SFTTrainer):
    """TRL's `SFTTrainer` with AdaPreLoRA (or any `make_optimizer` name) built from its `SFTConfig`."""

    def __init__(self, *args, **kwargs):
        sft_args = kwargs.get("args")
        processing_class = kwargs.get("processing_class")
        self._turn_masks = bool(sft_args is not None and sft_args.assistant_only_loss and processing_class is not None
                                and needs_turn_masks(_template_in_use(sft_args, processing_class)))
        if self._turn_masks:
            sft_args.assistant_only_loss = False  # TRL would refuse the template; the masks come from turn_masks
        super().__init__(*args, **kwargs)
        self._keep_float32_factors()

    def _keep_float32_factors(self) -> None:
        """Undo TRL's bf16 cast of the adapter on a quantized (QLoRA) model for the pair optimizers: a bf16
        factor keeps 8 bits of mantissa, so steps under 1/256 of a weight round away; float32 costs 2 bytes
        more per LoRA value (80 MB for a Llama-7B shape at rank 16). AdamW keeps TRL's choice."""
        model = self.model
        if self.optimizer_name in PAIR_OPTIMIZERS and (getattr(model, "is_loaded_in_4bit", False)
                                                       or getattr(model, "is_loaded_in_8bit", False)):
            for param in model.parameters():
                if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                    param.data = param.data.float()

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = getattr(dataset, "column_names", None) or []
        if self._turn_masks and "messages" in columns and "input_ids" not in columns:
            def tokenize(row, index):
                return turn_masks(processing_class, row["messages"], where=f"{dataset_name} data row {index + 1}")

            dataset = dataset.map(tokenize, with_indices=True, remove_columns=columns,
                                  desc=f"Masking the assistant turns of the {dataset_name} dataset")
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
