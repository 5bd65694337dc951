"""The flags of ``adaprelora-llm``: the dataclasses of ``trl sft``, a few defaults changed, and ours.

``trl sft`` parses `ScriptArguments`, `SFTConfig` and `ModelConfig` with `TrlParser` (which also
reads ``--config file.yaml``); this tool parses the same classes, so every flag of a ``trl sft``
command line means the same here. Added: `DataArguments` (local files, the optimizer, --merge)
and `AdaPreLoRAArguments` (the ``--adaprelora_*`` flags). Changed defaults, because this is
LoRA training with the optimizer in the name (see `SFTArguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

try:
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the adaprelora-llm command needs TRL: pip install 'adaprelora-diffusion[llm]'") from err

from ..optim import OPTIMIZERS
from .settings import AdaPreLoRAArguments

__all__ = ["DataArguments", "SFTArguments", "ClassifyArguments", "ModelConfig", "AdaPreLoRAArguments", "build_parser"]

DEFAULT_OUTPUT_DIR = "adaprelora-llm-output"

#: the default --learning_rate of each command, from `python benchmarks/llm_lr_sweep.py` (docs/llm.md has the table);
#: the one place to change after a rerun
DEFAULT_LEARNING_RATE = {"sft": 1e-2, "classify": 1e-2}


@dataclass
class DataArguments(ScriptArguments):
    """TRL's script arguments (``--dataset_name`` and its splits) plus local files and the optimizer."""

    dataset_path: str | None = field(default=None, metadata={
        "help": "training data: .jsonl/.json, .csv or .parquet with rows {text}, {messages} or {prompt, completion} "
                "(classify: {text, label}); instead of --dataset_name"})
    eval_dataset_path: str | None = field(default=None, metadata={"help": "held-out data in the same format"})
    optimizer: str = field(default="adaprelora", metadata={"help": f"one of: {', '.join(OPTIMIZERS)}",
                                                            "choices": list(OPTIMIZERS)})
    merge: bool = field(default=False, metadata={"help": "also write the base model with the LoRA merged in (OUTPUT/merged)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace the run already in --output_dir (its adapter and checkpoints); without it such a folder is refused"})


def _lr_help(command: str) -> str:
    return (f"learning rate (default {DEFAULT_LEARNING_RATE[command]:g}, from the sweep in docs/llm.md; AdaPreLoRA's lr "
            "means Adam's lr on W)")


@dataclass
class SFTArguments(SFTConfig):
    """TRL's `SFTConfig` with LoRA defaults: the swept lr (TRL's 2e-5 is a full fine-tuning lr), gradient
    checkpointing and bf16 off unless asked for (TRL turns both on; unset, transformers' own default, off,
    applies), TensorBoard logging."""

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where the adapter, checkpoints and logs go"})
    learning_rate: float = field(default=DEFAULT_LEARNING_RATE["sft"], metadata={"help": _lr_help("sft")})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "recompute activations in backward to save memory"})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard or none"})
    assistant_only_loss: bool | None = field(default=None, metadata={
        "help": "loss on the assistant turns only (default: on for {messages} rows; false: on every token)"})


@dataclass
class ClassifyArguments(TrainingArguments):
    """transformers' `TrainingArguments` for ``classify``, with the same defaults as `SFTArguments`."""

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where the adapter, checkpoints and logs go"})
    learning_rate: float = field(default=DEFAULT_LEARNING_RATE["classify"], metadata={"help": _lr_help("classify")})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard or none"})
    max_length: int = field(default=512, metadata={"help": "truncate texts to this many tokens"})


def accept_bare_booleans(parser) -> None:
    """Every boolean flag takes the bare form (``--gradient_checkpointing``) as well as a value.

    TRL's parser gives the bare form to ``bool`` fields and to ``bool | None`` fields with a
    non-None default; a ``bool | None`` field that defaults to None (``--gradient_checkpointing``,
    ``--tf32``, ...) wants a value, so a ``trl sft`` command line that uses the bare form fails with
    "expected one argument". This makes those flags take an optional value, ``True`` when bare.
    """
    from trl.scripts._hf_argparser import string_to_bool

    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True


def build_parser(command: str) -> TrlParser:
    """The parser of ``adaprelora-llm COMMAND`` (sft or classify)."""
    config = {"sft": SFTArguments, "classify": ClassifyArguments}[command]
    parser = TrlParser((DataArguments, config, ModelConfig, AdaPreLoRAArguments), prog=f"adaprelora-llm {command}")
    accept_bare_booleans(parser)
    return parser
