"""The ``adaprelora-llm`` command (also ``python -m adaprelora_diffusion.llm``).

    adaprelora-llm sft --model_name_or_path MODEL --dataset_path train.jsonl --output_dir out
    adaprelora-llm classify --model_name_or_path MODEL --dataset_path train.csv --eval_dataset_path dev.csv

Flags are those of ``trl sft`` (see config.py; ``--help`` lists all). TRL's `SFTTrainer` does the
tokenizing, chat templates, loss masks and packing; transformers' Trainer the loop, checkpoints,
TensorBoard and the progress bar. This module checks the flags and the data before anything is
loaded, runs one of the two commands and writes the output folder: the peft adapter with the
tokenizer, a model card and, with ``--merge``, the merged model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.atomic import atomic_write_text
from ..engine.command import EXIT_OK, EXIT_USAGE, report_error, pop_debug_flag
from ..engine.lock import OutputLock
from ..engine.model_source import looks_like_hub_id
from ..engine.signals import StopSignals
from ..optim.settings import lr_problem
from .data import SFT_FORMATS, DataError, MissingSplit, label_names, load_training_data
from .model_card import render_model_card
from .settings import AdaPreLoRASettings

__all__ = ["main", "run", "RunResult"]

COMMANDS = ("sft", "classify")
USAGE = ("usage: adaprelora-llm {sft,classify} [flags]   (adaprelora-llm sft --help lists the flags)\n"
         "  sft       supervised fine-tuning of a causal LM on {text}, {messages} or {prompt, completion} rows\n"
         "  classify  sequence classification on {text, label} rows, reporting accuracy")

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    trainer: Any
    output_dir: Path
    metrics: dict[str, float]
    data_format: str


# -- flags ------------------------------------------------------------------------------------
def check_flags(command: str, data, args, model, settings: AdaPreLoRASettings | None = None) -> None:
    """Reject bad or unsupported flags before anything is loaded, each with the fix."""
    from .sharding import deepspeed_refusal
    from .trainer import PAIR_OPTIMIZERS

    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(model.model_name_or_path is not None, "--model_name_or_path is required (a model folder or hub id).")
    need((data.dataset_path is None) != (data.dataset_name is None),
         "give exactly one of --dataset_path (a local file) and --dataset_name (a datasets loader or hub id).")
    need(data.eval_dataset_path is None or data.dataset_path is not None,
         "--eval_dataset_path goes with --dataset_path; with --dataset_name the eval split is --dataset_test_split.")
    need(not data.dataset_streaming, "--dataset_streaming is not supported: every row is checked before training starts.")
    need(model.lora_r >= 1, f"--lora_r must be >= 1, got {model.lora_r}.")
    need(model.lora_alpha > 0, f"--lora_alpha must be > 0, got {model.lora_alpha}.")
    need(0.0 <= model.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {model.lora_dropout}.")
    if model.load_in_4bit or model.load_in_8bit:
        flag = "--load_in_4bit" if model.load_in_4bit else "--load_in_8bit"
        need(importlib.util.find_spec("bitsandbytes") is not None,
             f"{flag} needs bitsandbytes: pip install 'adaprelora-diffusion[qlora]'.")
        need(not model.load_in_4bit or model.dtype in ("bfloat16", "float16", "float32"),
             f"--load_in_4bit computes in --dtype (as trl sft does): give --dtype bfloat16 (or float16, float32), "
             f"not {model.dtype}.")
        need(not (settings is not None and settings.scale_parameter and data.optimizer == "adaprelora"),
             f"--adaprelora_scale_parameter with {flag}: it scales each step by the base weight's RMS, and a quantized "
             "base weight is not stored as floats. Leave --adaprelora_scale_parameter off.")
    need(not (args.deepspeed and data.optimizer in PAIR_OPTIMIZERS), deepspeed_refusal(data.optimizer, "--deepspeed"))
    need(not (model.use_dora and data.optimizer in PAIR_OPTIMIZERS),
         f"--use_dora with --optimizer {data.optimizer}: DoRA changes the layer's forward map, which the closed-form "
         "step does not cover, so every factor would train with AdamW. Use --optimizer adamw for DoRA.")
    need(not lr_problem(args.learning_rate), lr_problem(args.learning_rate, "--learning_rate"))
    need(args.max_length is None or args.max_length >= 1, f"--max_length must be >= 1, got {args.max_length}.")
    has_evals = data.eval_dataset_path is not None or data.dataset_name is not None
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    need(strategy == "no" or has_evals, f"--eval_strategy {strategy} needs held-out data: add --eval_dataset_path.")
    need(strategy != "no" or args.eval_steps is None or has_evals, "--eval_steps needs held-out data: add --eval_dataset_path.")
    if problems:
        raise ValueError("invalid flags:\n  - " + "\n  - ".join(problems))


def _refuse_deepspeed_before_parsing(argv: list[str]) -> None:
    """``--deepspeed`` with a pair optimizer, refused before transformers parses it (parsing imports DeepSpeed,
    whose absence would be the error instead of the real reason). A DeepSpeed config given otherwise
    (``--config`` file, accelerate's config) is refused by `check_flags` or the trainer."""
    from .sharding import deepspeed_refusal
    from .trainer import PAIR_OPTIMIZERS

    optimizer = "adaprelora"
    for i, arg in enumerate(argv):
        if arg.startswith("--optimizer="):
            optimizer = arg.split("=", 1)[1]
        elif arg == "--optimizer" and i + 1 < len(argv):
            optimizer = argv[i + 1]
    if optimizer in PAIR_OPTIMIZERS and any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        raise ValueError(deepspeed_refusal(optimizer, "--deepspeed"))


def check_model_path(value: str) -> None:
    """A local model must be a folder with config.json; anything else must read as a hub id. Checked before
    the output folder is made, so a typo costs nothing."""
    path = Path(value).expanduser()
    expected = "expected a folder with config.json, or a hub id (owner/name)"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model_name_or_path {value}: no model in this folder (no config.json); {expected}.")
    elif path.exists() or not looks_like_hub_id(value, bare_names=True):
        raise ValueError(f"--model_name_or_path {value}: no model at {path}; {expected}.")


#: what a finished or interrupted run leaves in its output folder
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json")


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> list[Path]:
    """Refuse to write a new run over another one unless asked; returns what ``--overwrite_output_dir`` replaces."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; choose a folder.")
    previous = sorted(p for p in output_dir.iterdir()
                      if p.name in RUN_FILES or (p.is_dir() and p.name.startswith(PREFIX_CHECKPOINT_DIR + "-")))
    if previous and resume is None and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir} holds another run ({', '.join(p.name for p in previous[:4])}). Continue it with "
            "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or pick another --output_dir.")
    return previous if resume is None else []


def resolve_checkpoint(value: str | None, output_dir: Path) -> str | None:
    """``latest`` -> the newest checkpoint-N of the output folder; a path must be a Trainer checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None:
        return None
    if value == "latest":
        found = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if found is None:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}; "
                             "start without the flag, or pass a checkpoint folder.")
        return found
    if not (Path(value) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {value}: not a Trainer checkpoint (no trainer_state.json in it).")
    return value


# -- the two commands -------------------------------------------------------------------------
def _load_data(data, classify: bool):
    """``(train, eval or None, format, source)``, every row checked."""
    if data.dataset_path is not None:
        train, fmt = load_training_data(data.dataset_path, classify=classify)
        evals = None
        if data.eval_dataset_path is not None:
            evals, _ = load_training_data(data.eval_dataset_path, classify=classify, expect=fmt)
        return train, evals, fmt, data.dataset_path
    train, fmt = load_training_data(dataset_name=data.dataset_name, dataset_config=data.dataset_config,
                                    split=data.dataset_train_split, classify=classify)
    try:
        evals, _ = load_training_data(dataset_name=data.dataset_name, dataset_config=data.dataset_config,
                                      split=data.dataset_test_split, classify=classify, expect=fmt)
    except MissingSplit:
        evals = None  # no held-out split: train without eval
    return train, evals, fmt, data.dataset_name


def _keep_format_columns(loaded):
    """Drop columns the format does not use (ids, sources, ...): TRL would carry them into its batches."""
    train, evals, fmt, source = loaded
    keep = SFT_FORMATS.get(fmt, ("text", "label"))
    train, evals = (None if rows is None else rows.select_columns(list(keep)) for rows in (train, evals))
    if fmt == "classify" and len(label_names(train, evals)) < 2:
        raise DataError(f"{source}: every row has the label {train[0]['label']!r}; classification needs at least two labels.")
    return train, evals, fmt, source


def _load_pretrained(loader, model_args, args, **kwargs):
    """The model and tokenizer; with ``--load_in_4bit``/``--load_in_8bit`` the base model is quantized by
    bitsandbytes (TRL's `get_quantization_config`: compute dtype ``--dtype``) on this process's device and
    prepared by peft's `prepare_model_for_kbit_training` (frozen, norms and embeddings in float32)."""
    from transformers import AutoTokenizer
    from trl import get_quantization_config

    path = model_args.model_name_or_path
    quantization = get_quantization_config(model_args)
    if quantization is not None:  # bnb layers cannot be moved after loading: load each process's copy in place
        kwargs.update(quantization_config=quantization, device_map={"": args.device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
        model = loader.from_pretrained(path, revision=model_args.model_revision, dtype=model_args.dtype,
                                       attn_implementation=model_args.attn_implementation, **kwargs)
    except OSError as err:
        raise ValueError(f"--model_name_or_path {path}: could not load a model and tokenizer ({err}).") from err
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing),
                                                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    if tokenizer.pad_token is None:  # batches need padding; the usual choice for decoder-only models
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _peft_config(model_args, task_type: str):
    from trl import get_peft_config

    settings = dataclasses.replace(model_args, use_peft=True)  # LoRA is what this tool trains
    if settings.lora_task_type == "CAUSAL_LM" and task_type != "CAUSAL_LM":
        settings.lora_task_type = task_type
    return get_peft_config(settings)


def _sft(data, args, model_args, settings: AdaPreLoRASettings, resume: str | None, loaded, should_stop) -> RunResult:
    from transformers import AutoModelForCausalLM

    from .sft_trainer import AdaPreLoRASFTTrainer

    train, evals, fmt, source = loaded
    model, tokenizer = _load_pretrained(AutoModelForCausalLM, model_args, args)
    if fmt == "messages" and tokenizer.chat_template is None and args.chat_template_path is None:
        raise DataError(f"{source} holds chat messages, but the tokenizer of {model_args.model_name_or_path} has no chat "
                        "template: use a chat (instruct) model or pass --chat_template_path.")
    if args.assistant_only_loss is None:  # unset: the assistant turns of chat rows; TRL masks prompt-completion itself
        args.assistant_only_loss = fmt == "messages"
    _set_eval_strategy(args, evals)
    trainer = AdaPreLoRASFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
        peft_config=_peft_config(model_args, "CAUSAL_LM"), optimizer_name=data.optimizer, adaprelora=settings,
        should_stop=should_stop)
    return _train_and_save(trainer, tokenizer, data, args, model_args, settings, resume, fmt, source, evals)


def _classify(data, args, model_args, settings: AdaPreLoRASettings, resume: str | None, loaded, should_stop) -> RunResult:
    import numpy as np
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from .trainer import AdaPreLoRATrainer

    train, evals, fmt, source = loaded
    labels = label_names(train, evals)
    index = {label: i for i, label in enumerate(labels)}
    model, tokenizer = _load_pretrained(AutoModelForSequenceClassification, model_args, args, num_labels=len(labels),
                                        id2label={i: str(v) for i, v in enumerate(labels)},
                                        label2id={str(v): i for i, v in enumerate(labels)})

    def encode(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        out["labels"] = [index[v] for v in batch["label"]]
        return out

    train, evals = (None if rows is None else rows.map(encode, batched=True, remove_columns=rows.column_names)
                    for rows in (train, evals))

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    from peft import get_peft_model

    _set_eval_strategy(args, evals)
    trainer = AdaPreLoRATrainer(
        model=get_peft_model(model, _peft_config(model_args, "SEQ_CLS")), args=args, train_dataset=train,
        eval_dataset=evals, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy, optimizer_name=data.optimizer, adaprelora=settings, should_stop=should_stop)
    return _train_and_save(trainer, tokenizer, data, args, model_args, settings, resume, fmt, source, evals)


def _set_eval_strategy(args, evals) -> None:
    """Evaluate every --eval_steps (or as --eval_strategy says) when there is held-out data; always at the
    end (in _train_and_save)."""
    if evals is None:
        args.eval_strategy = "no"
    elif args.eval_steps is not None and args.eval_strategy == "no":
        args.eval_strategy = "steps"


def _train_and_save(trainer, tokenizer, data, args, model_args, settings, resume, fmt, source, evals) -> RunResult:
    trainer.train(resume_from_checkpoint=resume)
    stopped = getattr(trainer, "stopped_early", False)  # asked to stop: save, skip the final eval and merge
    metrics = trainer.evaluate() if evals is not None and not stopped else {}
    out = Path(args.output_dir)
    trainer.save_model(str(out))  # the adapter (adapter_config.json, adapter_model.safetensors), the tokenizer
    if trainer.is_world_process_zero():
        card_settings = {"optimizer": data.optimizer, "learning_rate": args.learning_rate,
                         "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                         "lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
                         "lora_dropout": model_args.lora_dropout, "lora_target_modules": model_args.lora_target_modules,
                         "per_device_train_batch_size": args.per_device_train_batch_size,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_length": args.max_length,
                         "seed": args.seed}
        if data.optimizer == "adaprelora":
            card_settings.update({f"adaprelora_{k}": v for k, v in dataclasses.asdict(settings).items()})
        atomic_write_text(out / "README.md", render_model_card(
            base_model=model_args.model_name_or_path, command="classify" if fmt == "classify" else "sft", data=source,
            data_format=fmt, settings=card_settings, metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            steps=trainer.state.global_step))
        if data.merge and not stopped:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(out / "merged"))
            tokenizer.save_pretrained(str(out / "merged"))
    return RunResult(trainer, out, metrics, fmt)


def run(command: str, argv: list[str], should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Parse ``argv`` for ``command`` and train; raises ValueError for bad flags or data (before anything is
    written). ``should_stop()`` turning true ends the run after the current step with a checkpoint."""
    from .config import build_parser

    _refuse_deepspeed_before_parsing(argv)
    parser = build_parser(command)
    data, args, model_args, adaprelora = parser.parse_args_and_config(argv)
    settings = adaprelora.settings()
    check_flags(command, data, args, model_args, settings)
    check_model_path(model_args.model_name_or_path)
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    replaced = check_output_dir(output_dir, resume, data.overwrite_output_dir)
    loaded = _keep_format_columns(_load_data(data, classify=command == "classify"))  # bad data: nothing written yet
    main_process = int(os.environ.get("RANK", "0")) == 0
    lock = OutputLock(output_dir).acquire() if main_process else None  # before anything is written there
    try:
        if lock is not None:
            for old in replaced:  # --overwrite_output_dir: the old run's adapter and checkpoints go
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        return (_sft if command == "sft" else _classify)(data, args, model_args, settings, resume, loaded, should_stop)
    finally:
        if lock is not None:
            lock.release()


#: values of transformers' own ``--debug`` (a bare ``--debug`` is ours: print the traceback of an error)
_TRANSFORMERS_DEBUG = ("underflow_overflow", "tpu_metrics_debug")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    command, (rest, debug) = argv[0], pop_debug_flag(argv[1:], values=_TRANSFORMERS_DEBUG)
    started = time.perf_counter()
    try:
        with StopSignals() as stop:
            result = run(command, rest, should_stop=stop)
    except (Exception, KeyboardInterrupt) as err:  # every error: one line and an exit status (engine.command)
        return report_error(err, debug=debug)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()
                        if k in ("eval_loss", "eval_accuracy", "eval_mean_token_accuracy"))
    stopped = getattr(result.trainer, "stopped_early", False)
    print(f"{'stopped early' if stopped else 'done'}: {result.trainer.state.global_step} steps in "
          f"{time.perf_counter() - started:.0f}s{'; ' + metrics if metrics else ''}; adapter: {result.output_dir}"
          + (f"; continue with --resume_from_checkpoint latest" if stopped else ""))
    return stop.exit_status if stopped else EXIT_OK
