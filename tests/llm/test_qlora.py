"""QLoRA: AdaPreLoRA on a base model quantized by bitsandbytes (4-bit NF4 and 8-bit), on the CPU.

bitsandbytes is optional (the ``[qlora]`` extra; ``[test]`` installs it too): without it these tests
skip, except the one-line error that names the extra.
"""

import importlib.util
import warnings

import pytest
import torch

from adaprelora_diffusion.llm.cli import main, run
from adaprelora_diffusion.llm.trainer import unwrap_optimizer
from adaprelora_diffusion.optim import AdaPreLoRA, find_lora_pairs

from .conftest import token_rows
from .test_cli import TEXT, quick, write_jsonl

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def quantized_llama(folder, **quantization):
    """The tiny Llama with its Linear layers quantized by bitsandbytes, prepared as for QLoRA, with LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**quantization),
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(**LORA))


def dequantized_twin(folder, quantized):
    """The same model in float32 with each quantized weight replaced by its dequantized value, and the same
    LoRA initialization: what the 4-bit model computes, without bitsandbytes' kernels."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        twin = get_peft_model(model, LoraConfig(**LORA))
    layers = dict(twin.named_modules())
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit" and not hasattr(module, "lora_A"):  # bitsandbytes' own layer
            with torch.no_grad():
                layers[name].weight.copy_(dequantize_bnb_weight(module.weight).float())
    return twin


@needs_bnb
def test_adaprelora_pairs_every_4bit_lora_layer_and_steps_like_on_the_dequantized_model(tiny_llama_dir):
    quantized = quantized_llama(tiny_llama_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    twin = dequantized_twin(tiny_llama_dir, quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "trained with AdamW instead" fallback
        pairs, others = find_lora_pairs(quantized)
    assert len(pairs) == 14 and others == []
    assert {type(p.module).__name__ for p in pairs} == {"Linear4bit"}
    models = (quantized, twin)
    optimizers = [AdaPreLoRA.from_model(m, lr=1e-2) for m in models]
    for row in token_rows(count=3):
        for model, optimizer in zip(models, optimizers):
            model(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    factors = [{n: p for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert factors[0].keys() == factors[1].keys()
    for name, value in factors[0].items():
        torch.testing.assert_close(value, factors[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(v.abs().max()) for n, v in factors[0].items() if "lora_B" in n) > 1e-3  # it trained


@needs_bnb
def test_8bit_lora_layers_pair_and_scale_parameter_refuses_quantized_weights(tiny_llama_dir):
    quantized = quantized_llama(tiny_llama_dir, load_in_8bit=True)
    pairs, others = find_lora_pairs(quantized)
    assert len(pairs) == 14 and others == [] and {type(p.module).__name__ for p in pairs} == {"Linear8bitLt"}
    optimizer = AdaPreLoRA.from_model(quantized, lr=1e-2, scale_parameter=True)
    row = token_rows(count=1)[0]
    quantized(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss.backward()
    with pytest.raises(ValueError, match="scale_parameter needs the floating-point base weight .* quantized layer"):
        optimizer.step()


@needs_bnb
def test_the_command_trains_a_4bit_model_with_float32_factors_and_the_adapter_loads_on_the_float_base(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "text.jsonl", [TEXT] * 4)
    out = tmp_path / "out"
    result = run("sft", quick(tiny_llama_dir, data, out, "--load_in_4bit", "--max_steps", "2", "--save_steps", "1"))
    optimizer = unwrap_optimizer(result.trainer.optimizer)
    assert isinstance(optimizer, AdaPreLoRA) and sum(len(b.pairs) for b in optimizer._buckets) == 14
    factors = {n: p for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert len(factors) == 28 and {p.dtype for p in factors.values()} == {torch.float32}  # not TRL's bf16
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    loaded = {n.replace(".default", ""): p for n, p in adapter.named_parameters() if "lora_" in n}
    for name, value in factors.items():
        torch.testing.assert_close(loaded[name.replace(".default", "")], value.detach())


@pytest.mark.parametrize("extra, message", [
    (["--adaprelora_scale_parameter"], "--adaprelora_scale_parameter with --load_in_4bit: it scales each step by the base"),
    (["--dtype", "auto"], "--load_in_4bit computes in --dtype (as trl sft does): give --dtype bfloat16"),
])
def test_quantized_runs_with_settings_that_cannot_work_are_refused_in_one_line(tmp_path, tiny_llama_dir, capsys, extra, message):
    data = write_jsonl(tmp_path / "text.jsonl", [TEXT] * 4)
    assert main(["sft", *quick(tiny_llama_dir, data, tmp_path / "out", "--load_in_4bit", *extra)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_without_bitsandbytes_load_in_4bit_names_the_extra(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    data = write_jsonl(tmp_path / "text.jsonl", [TEXT] * 4)
    assert main(["sft", *quick(tiny_llama_dir, data, tmp_path / "out", "--load_in_4bit")]) == 2
    assert "--load_in_4bit needs bitsandbytes: pip install 'adaprelora-diffusion[qlora]'" in capsys.readouterr().err
