"""AdaPreLoRA in transformers' Trainer: the plain path, AdaPreLoRATrainer, and the traps it handles."""

import re
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from adaprelora_diffusion.llm import AdaPreLoRASettings, AdaPreLoRATrainer, optimizer_cls_and_kwargs
from adaprelora_diffusion.llm.trainer import unwrap_optimizer
from adaprelora_diffusion.optim import AdaPreLoRA, make_optimizer

from .conftest import assert_same, peft_llama, token_rows, trainable


def targs(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                    disable_tqdm=True, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, seed=0,
                    train_sampling_strategy="sequential", lr_scheduler_type="constant", max_grad_norm=0.0,
                    logging_strategy="no")
    settings.update(kw)
    return TrainingArguments(**settings)


def train(model, args, rows=None, cls=AdaPreLoRATrainer, **kw):
    trainer = cls(model=model, args=args, train_dataset=rows or token_rows(), data_collator=default_data_collator, **kw)
    trainer.train()
    return trainer


@pytest.mark.parametrize("stats", ["sketch", "exact"])
def test_one_trainer_step_equals_one_standalone_step_with_clipping(tmp_path, tiny_llama_dir, stats):
    rows = token_rows()
    model = peft_llama(tiny_llama_dir)
    trainer = train(model, targs(tmp_path, max_steps=1, max_grad_norm=0.05), rows,
                    adaprelora=AdaPreLoRASettings(stats=stats))
    assert isinstance(unwrap_optimizer(trainer.optimizer), AdaPreLoRA)

    reference = peft_llama(tiny_llama_dir)
    optimizer = make_optimizer("adaprelora", reference, lr=1e-2, seed=0, stats=stats)
    reference(**default_data_collator(rows[:2])).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 0.05)
    assert norm > 0.05  # clipping did rescale the gradient the optimizer receives
    optimizer.step()
    assert_same(trainable(model), trainable(reference), exact=False)


def test_the_plain_trainer_path_and_the_factory_train_like_adapreloratrainer(tmp_path, tiny_llama_dir):
    args = targs(tmp_path, weight_decay=0.1, adam_beta1=0.5)
    ours = trainable(train(peft_llama(tiny_llama_dir), args).model)
    model = peft_llama(tiny_llama_dir)
    optimizer = make_optimizer("adaprelora", model, lr=args.learning_rate, weight_decay=0.1, adamw_betas=(0.5, 0.999), seed=0)
    plain = trainable(train(model, args, cls=Trainer, optimizers=(optimizer, None)).model)
    factory = trainable(train(peft_llama(tiny_llama_dir), args, cls=Trainer,
                              optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args)).model)
    assert_same(ours, plain)
    assert_same(ours, factory)


def test_training_arguments_and_settings_reach_the_optimizer(tmp_path, tiny_llama_dir):
    args = targs(tmp_path, max_steps=1, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6, seed=7)
    settings = AdaPreLoRASettings(stats="exact", damping=0.3, balance=0.25, beta1=0.5, beta2_decay=-0.8, scale_parameter=True)
    trainer = train(peft_llama(tiny_llama_dir), args, adaprelora=settings)
    opt = unwrap_optimizer(trainer.optimizer)
    group = opt.param_groups[0]
    # Adam's arguments reach the AdamW group; AdaPreLoRA's own betas come from its settings
    assert (group["weight_decay"], group["adamw_betas"], group["adamw_eps"], group["damping"], group["balance"]) == (
        0.05, (0.8, 0.99), 1e-6, 0.3, 0.25)
    assert (group["betas"], group["beta2_decay"], group["scale_parameter"]) == ((0.5, 0.999), -0.8, True)
    assert opt.stats == "exact"


def test_accumulating_two_micro_batches_equals_one_batch_and_hooks_fire_once_per_micro_batch(tmp_path, tiny_llama_dir):
    counts = []

    class CountHookPasses(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            counts.append(set(unwrap_optimizer(optimizer)._hooks.fired))

    one = trainable(train(peft_llama(tiny_llama_dir), targs(tmp_path)).model)
    two = train(peft_llama(tiny_llama_dir), targs(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2),
                callbacks=[CountHookPasses()])
    assert counts == [{2}, {2}]
    assert_same(one, trainable(two.model), exact=False)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_steps(tmp_path, tiny_llama_dir, reentrant):
    plain = trainable(train(peft_llama(tiny_llama_dir), targs(tmp_path)).model)
    args = targs(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = train(peft_llama(tiny_llama_dir), args)
    assert checkpointed.model.base_model.model.model.layers[0].gradient_checkpointing
    assert_same(plain, trainable(checkpointed.model))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("plain_trainer", [False, True])
def test_resuming_from_a_trainer_checkpoint_is_bit_identical(tmp_path, tiny_llama_dir, plain_trainer):
    def run(folder, resume=None, stop=None):
        model = peft_llama(tiny_llama_dir)
        args = targs(folder, max_steps=4, per_device_train_batch_size=1, gradient_accumulation_steps=2, save_strategy="steps",
                     save_steps=2, lr_scheduler_type="linear", train_sampling_strategy="random", max_grad_norm=1.0)
        kw = {"cls": Trainer, "optimizers": (make_optimizer("adaprelora", model, lr=args.learning_rate, seed=0), None)} if plain_trainer else {}
        trainer = AdaPreLoRATrainer if not plain_trainer else Trainer
        trainer = (kw.pop("cls", trainer))(model=model, args=args, train_dataset=token_rows(), data_collator=default_data_collator,
                                            callbacks=[StopAt(stop)] if stop else None, **kw)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = trainable(run(tmp_path / "straight").model)
    run(tmp_path / "halves", stop=2)
    checkpoint = tmp_path / "halves" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer loads on resume
    assert [g["lora"] for g in saved["param_groups"]] == [True]
    resumed = run(tmp_path / "halves", resume=str(checkpoint))
    assert resumed.state.global_step == 4
    assert_same(straight, trainable(resumed.model))


def test_modules_to_save_and_embedding_lora_train_in_the_adamw_group(tmp_path, tiny_llama_dir):
    model = peft_llama(tiny_llama_dir, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    before = trainable(model)
    trainer = train(model, targs(tmp_path, max_steps=1))
    opt = unwrap_optimizer(trainer.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    lora_group, adamw_group = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert all("q_proj" in n or "v_proj" in n for n in lora_group) and len(lora_group) == 8
    assert {n.split(".")[-2] if "lora_embedding" in n else n.split(".")[-3] for n in adamw_group} >= {"lora_embedding_A", "lora_embedding_B", "modules_to_save"}
    after = trainable(trainer.model)
    moved = [n for n in adamw_group if not torch.equal(before[n], after[n])]
    assert any("lm_head" in n for n in moved) and any("lora_embedding" in n for n in moved)


def test_dora_magnitudes_and_factors_go_to_adamw_beside_plain_lora_pairs(tmp_path, tiny_llama_dir):
    from peft import LoraConfig

    model = peft_llama(tiny_llama_dir, target_modules=["q_proj"])
    model.add_adapter("dora", LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    with pytest.warns(UserWarning, match="variant"):
        trainer = train(model, targs(tmp_path, max_steps=1))
    names = {id(p): n for n, p in model.named_parameters()}
    lora_group, adamw_group = ([names[id(p)] for p in g["params"]] for g in unwrap_optimizer(trainer.optimizer).param_groups)
    assert all("q_proj" in n for n in lora_group)
    assert any("lora_magnitude_vector" in n for n in adamw_group) and all("o_proj" in n for n in adamw_group)


def test_bf16_autocast_trains_like_float32(tmp_path, tiny_llama_dir):
    full = trainable(train(peft_llama(tiny_llama_dir), targs(tmp_path)).model)
    trainer = train(peft_llama(tiny_llama_dir), targs(tmp_path, bf16=True))
    half = trainable(trainer.model)
    assert unwrap_optimizer(trainer.optimizer).skipped_steps == 0
    moved = [k for k in full if "lora_B" in k]
    for k in moved:  # bf16 rounding moves the step a little, never its direction
        cos = torch.nn.functional.cosine_similarity(full[k].flatten(), half[k].flatten(), dim=0)
        assert cos > 0.99, (k, cos)


@pytest.mark.parametrize("cls", [AdaPreLoRATrainer, Trainer])
def test_a_step_skipped_by_the_grad_scaler_leaves_no_stale_statistics(tmp_path, tiny_llama_dir, cls):
    """fp16's GradScaler skips the optimizer step on overflow; Trainer then only calls model.zero_grad().
    CPU has no fp16 scaler, so the test installs torch's: the first scale overflows, the next fits.
    (No clipping: accelerate unscales before clipping only when it set up fp16 itself.)"""
    rows = token_rows()
    model = peft_llama(tiny_llama_dir)
    args = targs(tmp_path, max_steps=3)
    kw = {} if cls is AdaPreLoRATrainer else {"optimizers": (make_optimizer("adaprelora", model, lr=1e-2, seed=0), None)}
    trainer = cls(model=model, args=args, train_dataset=rows, data_collator=default_data_collator, **kw)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-107)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    skipped = unwrap_optimizer(trainer.optimizer).skipped_steps
    if cls is Trainer:  # the trap itself: the skipped step's inf statistics spoil the next step too
        assert skipped == 1
        return
    assert skipped == 0
    # the scaler skipped step 1 (the scheduler did not move); steps 2-3 are steps 1-2 on batches 2-3
    reference = peft_llama(tiny_llama_dir)
    train(reference, targs(tmp_path / "ref", max_steps=2), rows[2:])
    assert_same(trainable(model), trainable(reference), exact=False)


def test_a_fused_kernel_that_bypasses_the_hooks_falls_back_to_tangent_with_a_warning(tmp_path, tiny_llama_dir):
    model = peft_llama(tiny_llama_dir, target_modules=["q_proj", "v_proj"])
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            def fused(x, *args, module=module, **kwargs):  # what a fused LoRA kernel does: no submodule calls
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                return module.base_layer(x) + (x @ A.T @ B.T) * module.scaling["default"]
            module.forward = fused
    with pytest.warns(RuntimeWarning, match="never fired.*stats='tangent'"):
        trainer = train(model, targs(tmp_path))
    assert unwrap_optimizer(trainer.optimizer).stats == "tangent"
    reference = train(peft_llama(tiny_llama_dir, target_modules=["q_proj", "v_proj"]), targs(tmp_path),
                      adaprelora=AdaPreLoRASettings(stats="tangent"))
    assert_same(trainable(model), trainable(reference.model), exact=False)


def test_sharded_training_and_a_second_optimizer_choice_are_refused(tmp_path, tiny_llama_dir, monkeypatch):
    from types import SimpleNamespace

    model = peft_llama(tiny_llama_dir)
    with pytest.raises(ValueError, match="args.optim='adafactor' would be ignored.*--optimizer"):
        AdaPreLoRATrainer(model=model, args=targs(tmp_path, optim="adafactor"))
    with pytest.raises(ValueError, match="unknown optimizer_name 'adam'"):
        AdaPreLoRATrainer(model=model, args=targs(tmp_path), optimizer_name="adam")
    trainer = AdaPreLoRATrainer(model=model, args=targs(tmp_path))
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO gives the optimizer flat per-rank partitions.*FSDP2.*adamw"):
        trainer._check_supported()
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", False)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    plugin = SimpleNamespace(fsdp_version=1, ignored_modules=None)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)
    with pytest.raises(ValueError, match="FSDP version 1 with --optimizer adaprelora.*version.: 2"):
        trainer._check_supported()
    plugin.fsdp_version = 2  # FSDP2: the trainable parameters are left out of FSDP, by module name
    trainer._check_supported()
    kept = [name for name, module in model.named_modules() if re.fullmatch(plugin.ignored_modules, name)]
    assert len(kept) == 28 and all(name.endswith(("lora_A.default", "lora_B.default")) for name in kept)
    assert {id(p) for p in trainer._replicated} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="--resume_from_checkpoint under FSDP2 .* not supported yet"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    trainer.optimizer_name = "adamw"
    plugin.fsdp_version = 1
    trainer._check_supported()  # a plain optimizer is transformers' business


def test_sft_trainer_simple_path_and_mixin_agree(tmp_path, tiny_llama_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from adaprelora_diffusion.llm import AdaPreLoRASFTTrainer

    data = Dataset.from_list([{"text": "the cat is big and the dog is small ."}, {"text": "hello what is one plus two ?"}] * 2)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def config(name):
        return SFTConfig(output_dir=str(tmp_path / name), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                         max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, seed=0, bf16=False,
                         gradient_checkpointing=False, max_grad_norm=0.0, logging_strategy="no", shuffle_dataset=False,
                         train_sampling_strategy="sequential")

    ours = AdaPreLoRASFTTrainer(model=peft_llama(tiny_llama_dir), args=config("ours"), train_dataset=data, processing_class=tok)
    ours.train()
    model = peft_llama(tiny_llama_dir)
    plain = SFTTrainer(model=model, args=config("plain"), train_dataset=data, processing_class=tok,
                       optimizers=(make_optimizer("adaprelora", model, lr=1e-2, seed=0), None))
    plain.train()
    assert isinstance(unwrap_optimizer(ours.optimizer), AdaPreLoRA)
    assert_same(trainable(ours.model), trainable(plain.model))
