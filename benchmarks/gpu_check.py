"""The GPU check: one prepared command that measures what this toolkit does on a GPU box.

A GPU is lent to this project rarely, for minutes, on a bare machine without network. This
script is what such minutes are spent on, so it is written to work the first time and is run on
the CPU in CI with tiny shapes (``--smoke``, tests/benchmarks/test_gpu_check.py) so it never rots.
``scripts/gpu_check.sh`` installs the carried wheels and runs it in one call (docs/gpu.md).

Sections (``--sections`` picks; they run in this order):

* ``environment``: GPU, driver, CUDA, library versions.
* ``optimizer``: ``optimizer.step()`` alone on SD 1.5's 128 attention projections (rank 16 and
  64) and on one Llama-7B block's seven projections (rank 16): AdaPreLoRA (defaults) against
  AdamW (fused and foreach) and torch's Adafactor on the factors. The models, weights and the
  interleaved round order are those of benchmarks/optimizer_step.py.
* ``dreambooth``: the trainer's own ``train(TrainConfig(...))`` on SD 1.5's architecture (random
  weights built from its configs, saved as a local diffusers folder), 512 px, bf16, rank 16,
  UNet + text encoder, batch 1 and 4: steps/s, peak memory and the optimizer step's share of a
  step, AdaPreLoRA against AdamW.
* ``sampling``: 25 DDIM steps at 512 px of the SD 1.5 architecture with the LoRA the dreambooth
  section trained, loaded by diffusers' ``load_lora_weights``: seconds per image, LoRA fused and not.
* ``llm``: a Llama-architecture model of 1.24B parameters (Llama 3.2 1B's config, random
  weights), bf16, LoRA rank 16 on all linear layers, sequence 1024, through `AdaPreLoRATrainer`
  (transformers' Trainer): tokens/s and peak memory, AdaPreLoRA against AdamW.
* ``sdxl``: the trainer on SDXL's architecture at 1024 px with gradient checkpointing (UNet LoRA,
  batch 1): steps/s, peak memory, and whether that fits a 24 GB or a 16 GB card.

Timing: CUDA events on a GPU (perf_counter on the CPU), after warm-up steps; medians; the
AdamW baseline runs in the same process, interleaved step by step (optimizer) or run by run
(training). Every section runs in its own try/except under a time budget; ``gpu_check.json``
and ``gpu_check.md`` in ``--out`` are rewritten after every measurement, so a section that fails
or a run cut short still leaves everything that finished.

    python benchmarks/gpu_check.py --out gpu-check              # on a GPU: every section, about 5 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke     # CPU, tiny shapes, about a minute
    python benchmarks/gpu_check.py --sections optimizer llm --out gpu-check
    python benchmarks/gpu_check.py --render gpu-check/gpu_check.json   # reprint the tables
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("environment", "optimizer", "dreambooth", "sampling", "llm", "sdxl")
TITLES = {
    "environment": "Environment",
    "optimizer": "Optimizer step",
    "dreambooth": "DreamBooth end to end (SD 1.5 architecture)",
    "sampling": "Sampling with the trained LoRA (SD 1.5 architecture)",
    "llm": "LLM LoRA training (Llama architecture)",
    "sdxl": "DreamBooth on SDXL's architecture",
}
#: label -> (make_optimizer name, keyword arguments) for the optimizer-step section.
STEP_CONFIGS = {
    "adaprelora": ("adaprelora", {}),  # the optimizer's own defaults
    "adamw[fused]": ("adamw", {"fused": True}),
    "adamw[foreach]": ("adamw", {"foreach": True}),
    "adafactor": ("adafactor", {"foreach": True}),  # torch.optim.Adafactor on each factor
}
#: optimizer-step baselines that the ratios divide by
STEP_BASELINES = ("adamw[foreach]", "adamw[fused]")
TRAIN_OPTIMIZERS = ("adamw", "adaprelora")  # AdamW: the trainer's adamw, torch's default implementation
MIN_SECTION_S = 10.0  # a section with less time than this left is not started
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """What each section runs: the real shapes (a GPU run) or tiny ones on the same code path (--smoke)."""

    smoke: bool = False
    mixed_precision: str = "bf16"
    time_limit_s: float = 420.0  # the whole run
    budgets_s: dict[str, float] = field(default_factory=lambda: {
        "environment": 30, "optimizer": 75, "dreambooth": 120, "sampling": 45, "llm": 60, "sdxl": 120})
    # optimizer step
    opt_ranks: tuple[int, ...] = (16, 64)
    opt_llama_rank: int = 16
    opt_shrink: int = 1  # divide the real layer widths by this
    opt_layers: int | None = None  # the first N of SD 1.5's 128 projections (None: all)
    opt_tokens: int = 16
    opt_warmup: int = 5
    opt_steps: int = 20
    opt_repeats: int = 3
    # DreamBooth (SD 1.5) and SDXL
    sizes: dict[str, dict[str, dict]] = field(default_factory=dict)  # per family: config overrides (tiny widths)
    db_resolution: int = 512
    db_rank: int = 16
    db_batches: tuple[int, ...] = (1, 4)
    db_warmup: int = 3
    db_steps: int = 12
    sdxl_resolution: int = 1024
    sdxl_warmup: int = 2
    sdxl_steps: int = 8
    # sampling
    sample_steps: int = 25
    sample_repeats: int = 3
    # LLM
    llm_config: dict[str, Any] = field(default_factory=dict)  # default: Llama 3.2 1B
    llm_seq: int = 1024
    llm_batches: tuple[int, ...] = (1, 4)
    llm_rank: int = 16
    llm_warmup: int = 3
    llm_steps: int = 10


_TINY_TEXT = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
#: --smoke: every section on the CPU, tiny widths on the same code paths, a few steps.
SMOKE = Plan(
    smoke=True, time_limit_s=900.0,
    budgets_s={name: 240.0 for name in SECTIONS},
    opt_ranks=(2, 4), opt_llama_rank=2, opt_shrink=32, opt_layers=16, opt_tokens=4, opt_warmup=1, opt_steps=3, opt_repeats=2,
    sizes={
        "sd15": {"unet": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, cross_attention_dim=32,
                              attention_head_dim=2, norm_num_groups=8, sample_size=8),
                 "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
                 "text_encoder": _TINY_TEXT},
        "sdxl": {"unet": dict(block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                              attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=8 * 6 + 32, sample_size=8),
                 "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
                 "text_encoder": _TINY_TEXT, "text_encoder_2": _TINY_TEXT},
    },
    db_resolution=64, db_rank=4, db_batches=(1, 2), db_warmup=1, db_steps=3,
    sdxl_resolution=64, sdxl_warmup=1, sdxl_steps=2,
    sample_steps=4, sample_repeats=2,
    llm_config=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=256),
    llm_seq=32, llm_batches=(1, 2), llm_rank=4, llm_warmup=1, llm_steps=3,
)
FULL = Plan()


class SectionTimeout(BaseException):
    """A section ran past its budget (a BaseException, so that library code's `except Exception` lets it through)."""


class Terminated(BaseException):
    """SIGTERM (the outer time limit): record the running section and stop."""


# -- timing and memory -------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Timestamps: CUDA events on a GPU (read after one synchronize at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
        return [self._ms(a, b) for a, b in zip(self.marks, self.marks[1:])]

    def spans_ms(self) -> list[float]:
        """Milliseconds of each (start, end) pair of marks."""
        if self.cuda:
            torch.cuda.synchronize()
        return [self._ms(a, b) for a, b in zip(self.marks[::2], self.marks[1::2])]


def timed_calls(fn: Callable, clock: Clock, device: torch.device) -> Callable:
    """``fn`` that marks `clock` before and after each call, the GPU queue drained first, so that a
    step bound by kernel launches is charged its launch time and not hidden behind queued work."""

    def call(*args, **kwargs):
        sync(device)
        clock.mark()
        out = fn(*args, **kwargs)
        clock.mark()
        return out

    return call


class MemoryPeak:
    """Peak memory from construction on: GPU allocated and reserved (reset here), or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()

    def read(self) -> dict[str, float]:
        if self.cuda:
            return {"peak_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                    "peak_reserved_mib": torch.cuda.max_memory_reserved() / MIB,
                    "allocated_before_mib": self.before / MIB}
        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # process-wide, ever


def launches_per_call(fn: Callable, device: torch.device) -> tuple[int | None, str]:
    """(count, unit): CUDA kernels one call of ``fn`` launches (profiler; memcpy/memset left out), or on
    the CPU its top-level aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    events = prof.events()
    if cuda:
        kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))
        if kernels == 0:  # no kernel seen at all: the profiler's CUDA activity (CUPTI) did not work here
            return None, "CUDA kernels (the profiler saw none)"
        return kernels, "CUDA kernels"

    def nested(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if e.name.startswith("aten::") and not nested(e)), "aten ops (CPU)"


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# -- the run ---------------------------------------------------------------------------------
class Check:
    """One gpu_check run: the plan, the device, the results so far, the model folders it built."""

    def __init__(self, plan: Plan, device: torch.device, out: Path, work: Path, sections: list[str], argv: list[str]):
        self.plan, self.device, self.out, self.work = plan, device, out, work
        self.started = time.perf_counter()
        self.section_deadline = float("inf")
        self.pipelines: dict[str, Path] = {}
        self.trained_lora: Path | None = None
        self.payload: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu_check.py " + " ".join(argv),
            "smoke": plan.smoke, "device": describe_device(device), "sections_requested": sections,
            "plan": dataclasses.asdict(plan), "sections": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.plan.time_limit_s - self.elapsed()

    def section_left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def stop_training(self) -> bool:
        """Asked after each training step: end a run early (its steps so far still count) near the budget's end."""
        return self.section_left() < 5.0

    def save(self) -> None:
        from adaprelora_diffusion.engine.atomic import atomic_write_text

        self.payload["elapsed_s"] = round(self.elapsed(), 1)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.payload, indent=1, default=str))
        atomic_write_text(self.out / "gpu_check.md", render_markdown(self.payload))

    def pipeline(self, family: str, result: dict) -> Path:
        """The SD 1.5 / SDXL architecture with random weights as a local diffusers folder, built once per run."""
        from benchmarks.reference_configs import build_reference_pipeline

        if family not in self.pipelines:
            t0 = time.perf_counter()
            dtype = torch.bfloat16 if self.plan.mixed_precision == "bf16" else None
            self.pipelines[family] = build_reference_pipeline(self.work / f"{family}-random", family, device=str(self.device),
                                                              save_dtype=dtype, sizes=self.plan.sizes.get(family))
            result["build_s"] = round(time.perf_counter() - t0, 1)
            result["folder_mib"] = round(sum(f.stat().st_size for f in self.pipelines[family].rglob("*") if f.is_file()) / MIB)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.pipelines[family]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / GIB:.1f} GiB"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise SectionTimeout(f"stopped at its time budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(check: Check, sections: list[str]) -> bool:
    """Run each section under its budget; record ok / error / timeout / skipped; save after each. True if all ok."""
    all_ok = True
    for name in SECTIONS:
        if name not in sections:
            continue
        result: dict[str, Any] = {"status": "running"}
        check.payload["sections"][name] = result
        budget = min(check.plan.budgets_s[name], check.remaining())
        if budget < MIN_SECTION_S:
            result.update(status="skipped", error=f"not started: {check.remaining():.0f} s of the run's time limit left")
            all_ok = False
            check.save()
            continue
        result["budget_s"] = round(budget)
        check.section_deadline = time.perf_counter() + budget
        t0 = time.perf_counter()
        print(f"== {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        try:
            with time_limit(budget):
                RUNNERS[name](check, result)
            result["status"] = "ok"
        except SectionTimeout as err:
            result.update(status="timeout", error=str(err))
        except Terminated:
            result.update(status="killed", error="SIGTERM (the outer time limit) during this section")
            raise
        except Exception as err:  # one section's failure is recorded, never fatal to the others
            result.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
        finally:
            result["seconds"] = round(time.perf_counter() - t0, 1)
            check.section_deadline = float("inf")
            gc.collect()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
            check.save()
        all_ok &= result["status"] == "ok"
        print(render_section(name, result) + "\n", flush=True)
    return all_ok


# -- sections --------------------------------------------------------------------------------
def run_environment(check: Check, result: dict) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
                 "tokenizers", "numpy", "trl"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the build, e.g. 2.11.0+cu130 (a CUDA wheel's metadata says 2.11.0)
    result["versions"] = versions
    result["where"] = {name: _module_dir(name) for name in ("diffusers", "peft", "transformers")}
    result["python"] = platform.python_version()
    result["device"] = describe_device(check.device)
    result["cpu_count"] = os.cpu_count()
    result["torch_threads"] = torch.get_num_threads()
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        torch.zeros(1, device=check.device)  # create the CUDA context, so its size can be read
        free, total = torch.cuda.mem_get_info(check.device)
        result.update(gpu=props.name, gpu_memory_gib=round(total / GIB, 2), multiprocessors=props.multi_processor_count,
                      capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version(), driver=_driver_version(),
                      context_mib=round((total - free - torch.cuda.memory_reserved(check.device)) / MIB),
                      bf16_supported=torch.cuda.is_bf16_supported())


def _module_dir(name: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).parent.parent) if spec is not None and spec.origin else None


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_optimizer(check: Check, result: dict) -> None:
    """optimizer.step() alone, on benchmarks/optimizer_step.py's models, timed per optimizer, interleaved."""
    from benchmarks import optimizer_step as bench
    from benchmarks.reference_configs import llama_block_projection_shapes, sd15_attention_projection_shapes

    plan, shrink = check.plan, check.plan.opt_shrink
    sd15 = [(n, max(i // shrink, 4), max(o // shrink, 4)) for n, i, o in sd15_attention_projection_shapes()][:plan.opt_layers]
    llama = [(n, i // shrink, o // shrink) for n, i, o in llama_block_projection_shapes()]
    sets = [("SD 1.5 attention", sd15, rank) for rank in plan.opt_ranks] + [("Llama-7B block", llama, plan.opt_llama_rank)]
    result.update(tokens=plan.opt_tokens, warmup=plan.opt_warmup, steps=plan.opt_steps, repeats=plan.opt_repeats,
                  lr=bench.LR, start="trained", configs={k: {"name": n, "kwargs": kw} for k, (n, kw) in STEP_CONFIGS.items()},
                  sets=[], rows=[])
    for set_name, shapes, rank in sets:
        result["sets"].append({"set": set_name, "rank": rank, "shapes": [[i, o] for _, i, o in shapes]})
        result["rows"] += _step_rows(check, bench, set_name, shapes, rank)
        check.save()


def _step_rows(check: Check, bench, set_name: str, shapes, rank: int) -> list[dict]:
    from adaprelora_diffusion.optim import make_optimizer

    plan, device = check.plan, check.device
    weights = bench.base_weights(shapes, device, torch.float32)
    inputs = bench.make_inputs(weights, plan.opt_tokens)
    cache = bench.base_outputs(weights, inputs)
    labels = list(STEP_CONFIGS)
    step_medians = {label: [] for label in labels}
    backward_medians = {label: [] for label in labels}
    extra: dict[str, dict] = {label: {} for label in labels}
    for repeat in range(plan.opt_repeats):
        runs = []
        for label in labels:
            name, kwargs = STEP_CONFIGS[label]
            model = bench.build(weights, rank, "trained", cache)
            optimizer = make_optimizer(name, model, lr=bench.LR, **kwargs)
            steps, backwards = Clock(device), Clock(device)
            runs.append((model, optimizer, timed_calls(optimizer.step, steps, device), steps, backwards))
        times = {label: ([], []) for label in labels}
        for rnd in range(plan.opt_warmup + plan.opt_steps):
            for k in bench.round_order(len(runs), rank, repeat, rnd):
                model, optimizer, step, steps, backwards = runs[k]
                optimizer.zero_grad(set_to_none=True)
                loss = model(inputs)
                timed_calls(loss.backward, backwards, device)()
                step()
        for label, (model, optimizer, step, steps, backwards) in zip(labels, runs):
            step_ms, backward_ms = steps.spans_ms()[plan.opt_warmup:], backwards.spans_ms()[plan.opt_warmup:]
            step_medians[label].append(statistics.median(step_ms))
            backward_medians[label].append(statistics.median(backward_ms))
            if repeat == 0:
                optimizer.zero_grad(set_to_none=True)
                model(inputs).backward()
                sync(device)
                count, unit = launches_per_call(optimizer.step, device)
                extra[label] = {"launches": count, "launch_unit": unit, "state_bytes": bench.state_bytes(optimizer),
                                "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            if hasattr(optimizer, "close"):
                optimizer.close()
        del runs
        gc.collect()
    rows = []
    for label in labels:
        ratios = {base: statistics.median(a / b for a, b in zip(step_medians[label], step_medians[base])) for base in STEP_BASELINES}
        base_state = extra["adamw[foreach]"]["state_bytes"]
        rows.append({"set": set_name, "layers": len(shapes), "rank": rank, "optimizer": label,
                     "step_ms": statistics.median(step_medians[label]), "step_ms_per_repeat": step_medians[label],
                     "backward_ms": statistics.median(backward_medians[label]),
                     "x_adamw_foreach": ratios["adamw[foreach]"], "x_adamw_fused": ratios["adamw[fused]"],
                     "state_x_adamw": extra[label]["state_bytes"] / base_state if base_state else None, **extra[label]})
    return rows


def train_once(check: Check, family: str, result: dict, *, optimizer: str, batch: int, resolution: int, warmup: int,
               steps: int, text_encoder: bool, checkpointing: bool = False) -> dict:
    """One run of the trainer's own `train()`: step times from its progress events, the optimizer
    step's own time from a timer around `optimizer.step`, peak memory."""
    from adaprelora_diffusion.demo.descriptor import DEMO_INSTANCE_PROMPT, DEMO_SUBJECT_DIR
    from adaprelora_diffusion.dreambooth import TrainConfig, train

    device = check.device
    folder = check.pipeline(family, result)
    out = check.work / "runs" / f"{family}-{optimizer}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    clock, step_clock = Clock(device), Clock(device)
    loaded: list[float] = []

    def before_step(optimizer, args, kwargs):
        sync(device)
        step_clock.mark()

    def after_step(optimizer, args, kwargs):
        step_clock.mark()

    def on_step(step, models, inner_optimizer):
        if step == 0:  # before the first step: time each step of the optimizer the trainer built
            inner_optimizer.register_step_pre_hook(before_step)
            inner_optimizer.register_step_post_hook(after_step)
            loaded.append(time.perf_counter())

    def progress(event):
        if event.kind == "step":
            clock.mark()

    config = TrainConfig(
        pretrained_model_name_or_path=str(folder), output_dir=str(out), optimizer=optimizer, rank=check.plan.db_rank,
        resolution=resolution, train_batch_size=batch, train_text_encoder=text_encoder,
        gradient_checkpointing=checkpointing, mixed_precision=check.plan.mixed_precision,
        max_train_steps=warmup + steps, report_to="none", num_validation_images=0, checkpointing_steps=None,
        cpu=device.type == "cpu", seed=0, instance_data_dir=str(DEMO_SUBJECT_DIR), instance_prompt=DEMO_INSTANCE_PROMPT)
    memory = MemoryPeak(device)
    t0 = time.perf_counter()
    trained = train(config, progress=progress, should_stop=check.stop_training,
                    on_step=on_step)
    step_ms = clock.intervals_ms()[warmup - 1:] if warmup >= 1 else clock.intervals_ms()
    optimizer_ms = step_clock.spans_ms()[warmup:]
    if not step_ms:
        raise RuntimeError(f"{optimizer}, batch {batch}: no timed step within the budget ({trained.global_step} steps done)")
    row = {"optimizer": optimizer, "batch": batch, "resolution": resolution, "steps_done": trained.global_step,
           "timed_steps": len(step_ms), "step_ms": statistics.median(step_ms), "steps_per_s": 1e3 / statistics.median(step_ms),
           "images_per_s": batch * 1e3 / statistics.median(step_ms), "step_ms_spread": spread(step_ms),
           "optimizer_step_ms": statistics.median(optimizer_ms) if optimizer_ms else None,
           "set_up_s": round(loaded[0] - t0, 1) if loaded else None, "skipped_steps": trained.skipped_steps,
           "final_loss": trained.final_loss, "lora": str(trained.lora_path) if trained.lora_path else None, **memory.read()}
    row["optimizer_share"] = row["optimizer_step_ms"] / row["step_ms"] if row["optimizer_step_ms"] else None
    return row


def _alternating(batches: tuple[int, ...]) -> list[tuple[int, str]]:
    """(batch, optimizer) runs, the baseline first at one batch and second at the next, so warm-up order evens out."""
    order = []
    for k, batch in enumerate(batches):
        names = TRAIN_OPTIMIZERS if k % 2 == 0 else TRAIN_OPTIMIZERS[::-1]
        order += [(batch, name) for name in names]
    return order


def _add_ratios(rows: list[dict], key: str = "batch") -> None:
    """step time / AdamW's at the same batch, in place."""
    for row in rows:
        base = next((r for r in rows if r["optimizer"] == "adamw" and r[key] == row[key]), None)
        row["x_adamw"] = row["step_ms"] / base["step_ms"] if base else None


def run_dreambooth(check: Check, result: dict) -> None:
    plan = check.plan
    result.update(resolution=plan.db_resolution, rank=plan.db_rank, mixed_precision=plan.mixed_precision,
                  text_encoder=True, warmup=plan.db_warmup, steps=plan.db_steps, rows=[])
    for batch, optimizer in _alternating(plan.db_batches):
        if check.section_left() < 15:
            result.setdefault("not_run", []).append(f"{optimizer} batch {batch}: out of time")
            continue
        row = train_once(check, "sd15", result, optimizer=optimizer, batch=batch, resolution=plan.db_resolution,
                         warmup=plan.db_warmup, steps=plan.db_steps, text_encoder=True)
        result["rows"].append(row)
        _add_ratios(result["rows"])
        if optimizer == "adaprelora" and batch == plan.db_batches[0] and row["lora"]:
            check.trained_lora = Path(row["lora"]).parent
        check.save()


def run_sdxl(check: Check, result: dict) -> None:
    plan = check.plan
    context = check.payload["sections"].get("environment", {}).get("context_mib")
    result.update(resolution=plan.sdxl_resolution, rank=plan.db_rank, mixed_precision=plan.mixed_precision,
                  gradient_checkpointing=True, text_encoder=False, warmup=plan.sdxl_warmup, steps=plan.sdxl_steps,
                  context_mib=context, rows=[])
    for optimizer in TRAIN_OPTIMIZERS[::-1]:
        if check.section_left() < 20:
            result.setdefault("not_run", []).append(f"{optimizer}: out of time")
            continue
        row = train_once(check, "sdxl", result, optimizer=optimizer, batch=1, resolution=plan.sdxl_resolution,
                         warmup=plan.sdxl_warmup, steps=plan.sdxl_steps, text_encoder=False, checkpointing=True)
        if "peak_reserved_mib" in row:
            row.update(fits(row["peak_reserved_mib"], context))
        result["rows"].append(row)
        _add_ratios(result["rows"])
        check.save()


#: room left on a card for what this run does not hold (cuDNN workspaces differ by GPU, other processes)
HEADROOM_MIB = 512


def fits(peak_reserved_mib: float, context_mib: float | None) -> dict[str, Any]:
    """Would this run fit a 24 GB / 16 GB card? Peak reserved + CUDA context + HEADROOM_MIB <= N GiB."""
    need = peak_reserved_mib + (context_mib if context_mib is not None else 600) + HEADROOM_MIB
    return {"needs_mib": round(need), "fits_24gb": need <= 24 * 1024, "fits_16gb": need <= 16 * 1024}


def run_sampling(check: Check, result: dict) -> None:
    """Seconds per image with the trained LoRA loaded by diffusers, unfused and fused, interleaved."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from adaprelora_diffusion.demo.descriptor import DEMO_INSTANCE_PROMPT
    from adaprelora_diffusion.dreambooth.lora_files import LORA_WEIGHT_NAME

    plan, device = check.plan, check.device
    folder = check.pipeline("sd15", result)
    lora = check.trained_lora
    if lora is None:  # the dreambooth section did not run (or failed): train a LoRA here, a few steps
        row = train_once(check, "sd15", result, optimizer="adaprelora", batch=1, resolution=plan.db_resolution,
                         warmup=1, steps=2, text_encoder=True)
        lora = check.trained_lora = Path(row["lora"]).parent
        result["lora_trained_here_steps"] = row["steps_done"]
    dtype = torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME)
    result.update(steps=plan.sample_steps, resolution=plan.db_resolution, dtype=str(dtype).replace("torch.", ""),
                  scheduler="DDIM", guidance="classifier-free (scale 7.5)", lora=str(lora))

    def image():
        return pipe(DEMO_INSTANCE_PROMPT, num_inference_steps=plan.sample_steps, height=plan.db_resolution,
                    width=plan.db_resolution, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]

    clocks = {"unfused": Clock(device), "fused": Clock(device)}
    first: dict[str, Any] = {}
    for rnd in range(plan.sample_repeats + 1):  # round 0 warms up both
        for mode in ("unfused", "fused"):
            if mode == "fused":
                pipe.fuse_lora()
            if rnd == 0:
                first[mode] = image()
            else:
                timed_calls(image, clocks[mode], device)()
            if mode == "fused":
                pipe.unfuse_lora()
        if rnd == 0:
            result["fused_vs_unfused_max_abs_diff"] = float(abs(first["fused"].astype("float64") - first["unfused"]).max())
    result["rows"] = [{"lora": mode, "s_per_image": statistics.median(ms) / 1e3, "spread_s": spread([m / 1e3 for m in ms])}
                      for mode, ms in ((mode, clock.spans_ms()) for mode, clock in clocks.items())]
    del pipe


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token rows (labels = inputs): the cost of a step does not depend on the text."""

    def __init__(self, rows: int, length: int, vocab: int, seed: int = 0):
        self.ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_llm(check: Check, result: dict) -> None:
    from benchmarks.reference_configs import LLAMA_1B_CONFIG

    plan = check.plan
    config = plan.llm_config or LLAMA_1B_CONFIG
    result.update(config=config, seq=plan.llm_seq, rank=plan.llm_rank, mixed_precision=plan.mixed_precision,
                  lora_targets="all-linear", warmup=plan.llm_warmup, steps=plan.llm_steps, rows=[])
    for batch, optimizer in _alternating(plan.llm_batches):
        if check.section_left() < 15:
            result.setdefault("not_run", []).append(f"{optimizer} batch {batch}: out of time")
            continue
        result["rows"].append(llm_once(check, config, result, optimizer=optimizer, batch=batch))
        _add_ratios(result["rows"])
        check.save()


def llm_once(check: Check, config: dict, result: dict, *, optimizer: str, batch: int) -> dict:
    """One `AdaPreLoRATrainer` run on a freshly built random Llama: step times from a callback's marks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback, TrainingArguments, default_data_collator

    from adaprelora_diffusion.engine.accelerator import fresh_accelerator_state
    from adaprelora_diffusion.llm import AdaPreLoRATrainer

    plan, device = check.plan, check.device
    clock = Clock(device)

    class MarkSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    torch.manual_seed(0)
    dtype = torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config, use_cache=False), dtype=dtype)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["attention"] = getattr(model.config, "_attn_implementation", None)
    model = get_peft_model(model, LoraConfig(r=plan.llm_rank, lora_alpha=plan.llm_rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = plan.llm_warmup + plan.llm_steps
    args = TrainingArguments(
        output_dir=str(check.work / "llm" / f"{optimizer}-b{batch}"), per_device_train_batch_size=batch, max_steps=total,
        learning_rate=1e-4, lr_scheduler_type="constant", bf16=plan.mixed_precision == "bf16", use_cpu=device.type == "cpu",
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    fresh_accelerator_state()
    trainer = AdaPreLoRATrainer(model=model, args=args, train_dataset=RandomTokens(batch * total, plan.llm_seq, config["vocab_size"]),
                                data_collator=default_data_collator, optimizer_name=optimizer, callbacks=[MarkSteps()])
    built = time.perf_counter() - t0
    memory = MemoryPeak(device)
    trainer.train()
    step_ms = clock.intervals_ms()[plan.llm_warmup - 1:]
    row = {"optimizer": optimizer, "batch": batch, "seq": plan.llm_seq, "timed_steps": len(step_ms),
           "step_ms": statistics.median(step_ms), "tokens_per_s": batch * plan.llm_seq * 1e3 / statistics.median(step_ms),
           "step_ms_spread": spread(step_ms), "lora_params": lora_params, "build_s": round(built, 1), **memory.read()}
    del trainer, model
    return row


RUNNERS: dict[str, Callable[[Check, dict], None]] = {
    "environment": run_environment, "optimizer": run_optimizer, "dreambooth": run_dreambooth,
    "sampling": run_sampling, "llm": run_llm, "sdxl": run_sdxl,
}


# -- tables ----------------------------------------------------------------------------------
def _f(value, fmt: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _memory_cells(row: dict) -> str:
    if "peak_allocated_mib" in row:
        return f"{row['peak_allocated_mib']:.0f} | {row['peak_reserved_mib']:.0f}"
    return f"{row.get('peak_rss_mib', 0):.0f} (RSS) | -"


def render_section(name: str, result: dict) -> str:
    head = f"## {TITLES[name]}\n"
    status = result.get("status")
    if status != "ok":
        head += f"\n**{status}** after {result.get('seconds', '?')} s: {result.get('error', '')}\n"
        if not result.get("rows") and name != "environment":
            return head
        head += "\nWhat finished before that:\n"
    return head + "\n" + RENDERERS[name](result)


def _table_environment(r: dict) -> str:
    lines = ["| | |", "|---|---|", f"| device | {r.get('device')} |"]
    if "gpu" in r:
        lines += [f"| GPU | {r['gpu']}, {r['gpu_memory_gib']} GiB, {r['multiprocessors']} SMs, compute capability {r['capability']} |",
                  f"| driver / CUDA (torch) / cuDNN | {r['driver']} / {r['cuda']} / {r['cudnn']} |",
                  f"| CUDA context | {r['context_mib']} MiB |"]
    lines.append(f"| Python / CPU cores / torch threads | {r.get('python')} / {r.get('cpu_count')} / {r.get('torch_threads')} |")
    lines += [f"| {name} | {v or 'not installed'} |" for name, v in r.get("versions", {}).items()]
    return "\n".join(lines) + "\n"


def _table_optimizer(r: dict) -> str:
    lines = [f"`optimizer.step()` alone on float32 LoRA factors (B trained-like, lr {r.get('lr')}), {r.get('tokens')} tokens a "
             f"layer; {r.get('steps')} timed steps after {r.get('warmup')} warm-up, the four optimizers interleaved in a "
             f"shuffled order each round, {r.get('repeats')} repeats with fresh models; step ms: median [min-max] over "
             "repeats of each repeat's median, the GPU queue drained before each step; x AdamW: median per-repeat ratio; "
             "backward ms: AdaPreLoRA's default statistics are gathered by hooks in backward; launches: one step under "
             "the profiler; state: the tensors in `optimizer.state`.", "",
             "| layers | rank | optimizer | step ms | x AdamW foreach | x AdamW fused | backward ms | launches/step | state MiB | state x AdamW |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r.get("rows", []):
        per = row["step_ms_per_repeat"]
        lines.append(f"| {row['set']} ({row['layers']}) | {row['rank']} | {row['optimizer']} | {row['step_ms']:.3f} "
                     f"[{min(per):.3f}-{max(per):.3f}] | {_f(row['x_adamw_foreach'])} | {_f(row['x_adamw_fused'])} | "
                     f"{row['backward_ms']:.2f} | {_f(row.get('launches'), 'd')} {_unit(row)} | {row['state_bytes'] / MIB:.3f} | "
                     f"{_f(row['state_x_adamw'], '.3f')} |")
    return "\n".join(lines) + "\n"


def _unit(row: dict) -> str:
    unit = row.get("launch_unit", "")
    return "" if unit == "CUDA kernels" else "(aten ops)" if unit == "aten ops (CPU)" else f"({unit})"


def _table_training(r: dict, what: str) -> str:
    lines = [f"{what}; {r.get('steps')} timed steps after {r.get('warmup')} warm-up (median; one run per row, in the "
             "order of the rows); optimizer step: `optimizer.step()` inside "
             "the trainer (GPU queue drained first), and its share of the median step; memory: peak allocated and "
             "reserved by torch in the run, frozen weights included.", "",
             "| batch | optimizer | steps/s | images/s | step ms | x AdamW | optimizer step ms | share of step | peak allocated MiB | peak reserved MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r.get("rows", []):
        share = f"{100 * row['optimizer_share']:.1f}%" if row.get("optimizer_share") is not None else "-"
        lines.append(f"| {row['batch']} | {row['optimizer']} | {row['steps_per_s']:.2f} | {row['images_per_s']:.2f} | "
                     f"{row['step_ms']:.1f} | {_f(row.get('x_adamw'))} | {_f(row.get('optimizer_step_ms'))} | {share} | "
                     f"{_memory_cells(row)} |")
    for note in r.get("not_run", []):
        lines.append(f"\nnot run: {note}")
    return "\n".join(lines) + "\n"


def _table_dreambooth(r: dict) -> str:
    text = _table_training(r, f"`train(TrainConfig(...))` at {r.get('resolution')} px, {r.get('mixed_precision')}, LoRA rank "
                              f"{r.get('rank')} on the UNet and the text encoder")
    if r.get("build_s") is not None:
        text += f"\nRandom-weight pipeline built and saved in {r['build_s']} s ({r.get('folder_mib')} MiB).\n"
    shares = [row["optimizer_share"] for row in r.get("rows", []) if row["optimizer"] == "adaprelora" and row.get("optimizer_share")]
    if shares:
        text += (f"\nAdaPreLoRA's optimizer step: {100 * max(shares):.1f}% of a training step at most "
                 f"({'above' if max(shares) > 0.03 else 'within'} the 3% that calls for a fewer-kernel step).\n")
    return text


def _table_sdxl(r: dict) -> str:
    text = _table_training(r, f"`train(TrainConfig(...))` at {r.get('resolution')} px, {r.get('mixed_precision')}, "
                              f"gradient checkpointing, LoRA rank {r.get('rank')} on the UNet, batch 1")
    fit_rows = [row for row in r.get("rows", []) if "needs_mib" in row]
    if fit_rows:
        text += ("\n| optimizer | needs MiB (peak reserved + CUDA context + 512 headroom) | fits 24 GB | fits 16 GB |\n"
                 "|---|---:|---|---|\n")
        text += "".join(f"| {row['optimizer']} | {row['needs_mib']} | {'yes' if row['fits_24gb'] else 'no'} | "
                        f"{'yes' if row['fits_16gb'] else 'no'} |\n" for row in fit_rows)
    if r.get("build_s") is not None:
        text += f"\nRandom-weight pipeline built and saved in {r['build_s']} s ({r.get('folder_mib')} MiB).\n"
    return text


def _table_sampling(r: dict) -> str:
    lines = [f"{r.get('steps')} {r.get('scheduler')} steps, {r.get('resolution')} px, {r.get('dtype')}, "
             f"{r.get('guidance')}, the LoRA loaded with diffusers' `load_lora_weights`; fused with `fuse_lora()`; "
             "median over images, modes alternating, one warm-up image each.", "",
             "| LoRA | s/image | [min-max] | images |", "|---|---:|---:|---:|"]
    for row in r.get("rows", []):
        s = row["spread_s"]
        lines.append(f"| {row['lora']} | {row['s_per_image']:.3f} | [{s['min']:.3f}-{s['max']:.3f}] | {s['n']} |")
    if "fused_vs_unfused_max_abs_diff" in r:
        lines.append(f"\nLargest pixel difference fused vs unfused (0-1 scale): {r['fused_vs_unfused_max_abs_diff']:.4f}.")
    return "\n".join(lines) + "\n"


def _table_llm(r: dict) -> str:
    params = r.get("params")
    lines = [f"`AdaPreLoRATrainer` (transformers' Trainer) on a random Llama ({params / 1e9 if params else 0:.2f}B parameters, "
             f"{r.get('attention')} attention), {r.get('mixed_precision')}, LoRA rank {r.get('rank')} on all linear layers, "
             f"sequence {r.get('seq')}; {r.get('steps')} timed steps after {r.get('warmup')} warm-up (median, CUDA events "
             "at each step's end); memory: peak allocated and reserved in the run, weights included.", "",
             "| batch | optimizer | tokens/s | step ms | x AdamW | peak allocated MiB | peak reserved MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in r.get("rows", []):
        lines.append(f"| {row['batch']} | {row['optimizer']} | {row['tokens_per_s']:.0f} | {row['step_ms']:.1f} | "
                     f"{_f(row.get('x_adamw'))} | {_memory_cells(row)} |")
    for note in r.get("not_run", []):
        lines.append(f"\nnot run: {note}")
    return "\n".join(lines) + "\n"


RENDERERS = {"environment": _table_environment, "optimizer": _table_optimizer, "dreambooth": _table_dreambooth,
             "sampling": _table_sampling, "llm": _table_llm, "sdxl": _table_sdxl}


def render_markdown(payload: dict) -> str:
    kind = "smoke run (tiny shapes, not figures)" if payload.get("smoke") else "GPU check"
    parts = [f"# gpu_check: {kind}\n",
             f"{payload.get('device')}; started {payload.get('started')}; {payload.get('elapsed_s', '?')} s.\n"
             f"Command: `{payload.get('command')}`\n"]
    for name in SECTIONS:
        if name in payload.get("sections", {}):
            parts.append(render_section(name, payload["sections"][name]))
    return "\n".join(parts)


# -- command line ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true", help="every section with tiny shapes, on the CPU unless --device says")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where there is one; cpu with --smoke)")
    parser.add_argument("--time_limit", type=float, help="seconds for the whole run (default 420; --smoke 900); "
                        "a section that would start later is skipped, one that runs over its budget is stopped")
    parser.add_argument("--work", type=Path, help="folder for the model folders and runs (default: a temporary one, removed)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print the tables of a saved gpu_check.json; run nothing")
    args = parser.parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; never wait on a network there is none of
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would crowd the tables out of a short log tail
    plan = SMOKE if args.smoke else FULL
    if args.time_limit is not None:
        plan = dataclasses.replace(plan, time_limit_s=args.time_limit)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu.")
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: no GPU; the full shapes on a CPU take hours. Use --smoke for a CPU rehearsal.", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        work.mkdir(parents=True, exist_ok=True)
        check = Check(plan, device, args.out, work, [s for s in SECTIONS if s in args.sections], argv)
        check.save()

        def on_term(signum, frame):
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            ok = run_sections(check, args.sections)
        except Terminated:
            check.payload["terminated"] = True
            check.save()
            return 143
        finally:
            signal.signal(signal.SIGTERM, previous)
    statuses = {name: r["status"] for name, r in check.payload["sections"].items()}
    print(f"gpu_check: {statuses} in {check.elapsed():.0f} s; tables in {args.out / 'gpu_check.md'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
