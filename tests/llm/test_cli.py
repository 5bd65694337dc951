"""The adaprelora-llm command: data formats and loss masks, the output folder, resume, errors."""

import json
import re

import pytest
import torch

from adaprelora_diffusion.llm.cli import main, run
from adaprelora_diffusion.llm.trainer import unwrap_optimizer
from adaprelora_diffusion.optim import AdaPreLoRA

CHAT = {"messages": [{"role": "system", "content": "answer please ."},
                     {"role": "user", "content": "what is one plus two ?"},
                     {"role": "assistant", "content": "three ."}]}
PROMPT = {"prompt": "what is one plus two ?", "completion": "three ."}
TEXT = {"text": "the cat is big and the dog is small ."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_table(path, rows):
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


def quick(model_dir, data, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out), "--use_cpu",
            "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--lora_r", "4", "--lora_target_modules", "all-linear", "--learning_rate", "1e-2", *extra]


def learned_tokens(trainer):
    """The tokens of the first training row that carry loss, after TRL's tokenizing and collating."""
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return trainer.processing_class.convert_ids_to_tokens(ids[labels != -100])


@pytest.mark.parametrize("name, rows, learned", [
    ("chat.jsonl", [CHAT] * 4, ["three", ".", "<|end|>"]),  # the assistant turn only
    ("pc.csv", [PROMPT] * 4, ["three", ".", "</s>"]),  # the completion only
    ("text.parquet", [TEXT] * 4, "the cat is big and the dog is small . </s>".split()),  # everything
])
def test_each_data_format_trains_with_its_loss_mask(tmp_path, tiny_llama_dir, name, rows, learned):
    data = (write_jsonl if name.endswith(".jsonl") else write_table)(tmp_path / name, rows)
    result = run("sft", quick(tiny_llama_dir, data, tmp_path / "out"))
    assert learned_tokens(result.trainer) == learned
    assert isinstance(unwrap_optimizer(result.trainer.optimizer), AdaPreLoRA)
    assert result.trainer.state.global_step == 1


def test_sft_output_folder_reloads_with_peft_and_has_card_logs_checkpoints_and_merge(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 8)
    out = tmp_path / "out"
    result = run("sft", quick(tiny_llama_dir, data, out, "--eval_dataset_path", str(data), "--max_steps", "2",
                              "--eval_steps", "1", "--save_steps", "1", "--report_to", "tensorboard", "--merge",
                              "--adaprelora_stats", "exact"))
    assert unwrap_optimizer(result.trainer.optimizer).stats == "exact"
    assert {"eval_loss", "eval_mean_token_accuracy"} <= set(result.metrics)
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*"))  # TensorBoard
    card = (out / "README.md").read_text()
    assert "adaprelora_stats | exact" in card and "eval_loss" in card and "PeftModel.from_pretrained" in card

    ids = AutoTokenizer.from_pretrained(out)("<|user|> what is one plus two ?", return_tensors="pt").input_ids
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        trained = result.trainer.model.eval()(ids).logits  # the merged model in memory after --merge
        torch.testing.assert_close(adapter(ids).logits, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(ids).logits, trained, atol=1e-4)  # the adapter did change the model


def test_resume_latest_continues_bit_identically(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the {w} is big and the dog is small ."} for w in "cat dog bird fish cow horse robot sun".split()])
    common = ["--save_steps", "2", "--lr_scheduler_type", "constant", "--gradient_accumulation_steps", "2",
              "--per_device_train_batch_size", "1", "--lora_dropout", "0.1"]
    run("sft", quick(tiny_llama_dir, data, tmp_path / "straight", *common, "--max_steps", "4"))
    run("sft", quick(tiny_llama_dir, data, tmp_path / "halves", *common, "--max_steps", "2"))
    resumed = run("sft", quick(tiny_llama_dir, data, tmp_path / "halves", *common, "--max_steps", "4",
                               "--resume_from_checkpoint", "latest"))
    assert resumed.trainer.state.global_step == 4
    one = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    two = load_file(tmp_path / "halves" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_gpt2_and_a_yaml_config(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "text.jsonl", [TEXT] * 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_gpt2_dir}\ndataset_path: {data}\nlora_r: 2\nadaprelora_damping: 0.3\n")
    args = quick(tiny_gpt2_dir, data, tmp_path / "out")
    args = args[4:]  # model and data come from the file
    result = run("sft", ["--config", str(config), *args])
    optimizer = unwrap_optimizer(result.trainer.optimizer)
    assert isinstance(optimizer, AdaPreLoRA) and optimizer.param_groups[0]["damping"] == 0.3
    assert sum(len(b.pairs) for b in optimizer._buckets) == 8  # c_attn, c_proj, c_fc, mlp c_proj in 2 blocks
    assert optimizer._buckets[0].pairs[0].A.shape[0] == 4  # a flag on the command line wins over the file


def test_classify_reports_accuracy_and_the_adapter_reloads(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"text": f"the {w} is big", "label": "big"} for w in ("cat", "dog", "bird")] + \
           [{"text": f"the {w} is small", "label": "small"} for w in ("cat", "dog", "bird")]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    out = tmp_path / "out"
    result = run("classify", quick(tiny_llama_dir, data, out, "--eval_dataset_path", str(data), "--max_steps", "3",
                                   "--max_length", "16"))
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    groups = unwrap_optimizer(result.trainer.optimizer).param_groups
    assert any("score" in n for n, p in result.trainer.model.named_parameters()
               if any(p is q for q in groups[1]["params"]))  # the new head trains in the AdamW group
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the cat is big", "the dog is small"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    assert reloaded.config.id2label == {0: "big", 1: "small"} or base.config.num_labels == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.trainer.model.eval()(**batch).logits)


def _bad(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"train.jsonl: could not be read: line 2 is not valid JSON"),
    (['{"text": "a b"}', '{"text": "c"}', '{"prompt": "x", "completion": "y"}'],
     r"train.jsonl row 3: has 'prompt', but the file's rows are in the text format"),
    (['{"question": "a", "answer": "b"}'], r"train.jsonl: rows need the fields of one format: .*row 1 has \['answer', 'question'\]"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"train.jsonl row 1 'messages': no assistant message"),
    (['{"messages": [{"role": "robot", "content": "hi"}]}'], r"train.jsonl row 1 'messages': message 0 must be"),
    (['{"text": "a"}', '{"text": ""}'], r"train.jsonl row 2: 'text' must be non-empty text"),
])
def test_bad_data_is_a_clear_error_naming_file_and_row(tmp_path, tiny_llama_dir, capsys, lines, message):
    out = tmp_path / "out"
    assert main(["sft", *quick(tiny_llama_dir, _bad(tmp_path, lines), out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # datasets' progress bars come first
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize("extra, message", [
    (["--optimizer", "adaprelora", "--use_dora"], "--use_dora with --optimizer adaprelora: DoRA .* Use --optimizer adamw"),
    (["--load_in_4bit", "--load_in_8bit"], "can't use 8 bit and 4 bit precision at the same time"),  # TRL's check
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--eval_steps", "2"], "--eval_steps needs held-out data: add --eval_dataset_path"),
    (["--resume_from_checkpoint", "latest"], "no checkpoint-N folder in .*out"),
    (["--dataset_name", "some/set"], "give exactly one of --dataset_path .* and --dataset_name"),
])
def test_bad_flags_are_clear_errors(tmp_path, tiny_llama_dir, capsys, extra, message):
    data = write_jsonl(tmp_path / "t.jsonl", [TEXT])
    assert main(["sft", *quick(tiny_llama_dir, data, tmp_path / "out"), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_files_commands_and_optimizers(tmp_path, tiny_llama_dir, capsys):
    assert main(["sft", *quick(tiny_llama_dir, tmp_path / "missing.jsonl", tmp_path / "o")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    assert main(["sft", *quick(tiny_llama_dir, tmp_path / "t.txt", tmp_path / "o")]) == 2
    assert "unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet" in capsys.readouterr().err
    assert main(["train"]) == 2 and "usage: adaprelora-llm {sft,classify}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own error for a choice
        main(["sft", *quick(tiny_llama_dir, tmp_path / "t.txt", tmp_path / "o"), "--optimizer", "adam"])
    assert stop.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    assert main(["classify", *quick(tiny_llama_dir, tmp_path / "c.jsonl", tmp_path / "o")]) == 2
    assert "classification needs at least two labels" in capsys.readouterr().err


def test_dataset_name_loads_with_datasets_and_evaluates_on_its_test_split(tmp_path, tiny_llama_dir):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [PROMPT] * 4)
    args = quick(tiny_llama_dir, "unused", tmp_path / "out")
    args[2:4] = ["--dataset_name", str(folder)]  # in place of --dataset_path
    assert run("sft", args).metrics == {}  # no test split: no eval
    write_jsonl(folder / "test.jsonl", [PROMPT] * 2)
    args[args.index("--output_dir") + 1] = str(tmp_path / "out2")
    result = run("sft", args)
    assert "eval_loss" in result.metrics and learned_tokens(result.trainer) == ["three", ".", "</s>"]
