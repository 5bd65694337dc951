"""adaprelora-llm as dependable as the DreamBooth command (issue 22): chat templates without generation
markers, bare boolean flags, a finished output folder, model-path and empty-file errors, SIGTERM, divergence."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adaprelora_diffusion.llm.cli import main, run
from adaprelora_diffusion.llm.config import build_parser

from .test_cli import CHAT, TEXT, learned_tokens, quick, write_jsonl
from .tiny_models import CHAT_TEMPLATE, save_pretrained_tiny_model

ROOT = Path(__file__).resolve().parents[2]

#: the same turns without {% generation %} markers (what most fine-tuned models ship)
PLAIN_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
#: a template that puts a default system prompt first when the conversation has none
SYSTEM_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|system|> answer please . <|end|> {% endif %}" + PLAIN_TEMPLATE)
#: renders the last user turn differently: not prefix-preserving
BROKEN_TEMPLATE = ("{% for message in messages %}{% if loop.last %}<|{{ message['role'] }}|> {{ message['content'] }} "
                   "{% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return save_pretrained_tiny_model(tmp_path_factory.mktemp("pretrained-llama"))


def with_template(folder, model_dir, template):
    """A copy of the tiny model whose tokenizer carries ``template``."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("template, learned", [
    (CHAT_TEMPLATE, ["three", ".", "<|end|>"]),  # markers: TRL's own masks
    (PLAIN_TEMPLATE, ["three", ".", "<|end|>"]),  # no markers: masks by rendering the turns
    (SYSTEM_TEMPLATE, ["three", ".", "<|end|>"]),  # a system prompt the template adds
])
def test_chat_rows_train_on_the_assistant_turns_whatever_the_template(tmp_path, tiny_llama_dir, template, learned):
    model = with_template(tmp_path / "model", tiny_llama_dir, template)
    rows = [{"messages": CHAT["messages"][1:]}] * 4  # user, assistant
    result = run("sft", quick(model, write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "out"))
    assert learned_tokens(result.trainer) == learned
    assert result.trainer.state.global_step == 1


def test_two_assistant_turns_are_both_learned_and_the_loss_falls_on_them(tmp_path, tiny_llama_dir):
    model = with_template(tmp_path / "model", tiny_llama_dir, PLAIN_TEMPLATE)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."},
             {"role": "user", "content": "what is one plus two ?"}, {"role": "assistant", "content": "three ."}]
    result = run("sft", quick(model, write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 4), tmp_path / "out",
                              "--max_steps", "6", "--save_strategy", "no", "--logging_steps", "1"))
    assert learned_tokens(result.trainer) == ["hello", ".", "<|end|>", "three", ".", "<|end|>"]
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert losses and losses[-1] < losses[0]


def test_a_template_that_is_not_prefix_preserving_is_a_one_line_error(tmp_path, tiny_llama_dir, capsys):
    model = with_template(tmp_path / "model", tiny_llama_dir, BROKEN_TEMPLATE)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT["messages"][1:]}] * 2)
    assert main(["sft", *quick(model, data, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train data row 1" in err and "--chat_template_path" in err and "--assistant_only_loss false" in err
    result = run("sft", quick(model, data, tmp_path / "out2", "--assistant_only_loss", "false"))  # the way out
    assert "<|user|>" in learned_tokens(result.trainer)  # every token


def test_every_boolean_flag_takes_the_bare_form_as_trl_sft_does():
    from trl.scripts._hf_argparser import string_to_bool

    parser = build_parser("sft")
    booleans = [a for a in parser._actions if a.type is string_to_bool]
    assert len(booleans) > 20 and all(a.nargs == "?" and a.const is True for a in booleans)
    _, args, _, _ = parser.parse_args_and_config(["--gradient_checkpointing", "--use_cpu", "--assistant_only_loss"])
    assert args.gradient_checkpointing is True and args.assistant_only_loss is True
    _, args, _, _ = parser.parse_args_and_config(["--gradient_checkpointing", "false"])
    assert args.gradient_checkpointing is False and args.assistant_only_loss is None  # unset: chosen by the data


def test_eval_strategy_without_eval_data_names_the_flag_given(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [TEXT])
    assert main(["sft", *quick(tiny_llama_dir, data, tmp_path / "out"), "--eval_strategy", "steps"]) == 2
    err = capsys.readouterr().err
    assert "--eval_strategy steps needs held-out data" in err and "--eval_steps" not in err


def test_a_finished_run_is_not_replaced_unless_asked(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [TEXT] * 4)
    out = tmp_path / "out"
    run("sft", quick(tiny_llama_dir, data, out, "--save_steps", "1"))
    adapter = (out / "adapter_model.safetensors").read_bytes()
    assert main(["sft", *quick(tiny_llama_dir, data, out, "--learning_rate", "3e-2")]) == 2
    assert "holds another run (adapter_config.json, adapter_model.safetensors, checkpoint-1)" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # untouched
    run("sft", quick(tiny_llama_dir, data, out, "--learning_rate", "3e-2", "--overwrite_output_dir", "--save_strategy", "no"))
    assert (out / "adapter_model.safetensors").read_bytes() != adapter and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "no" / "such" / "model", "no model at .*no/such/model; expected a folder with config.json, or a hub id"),
    (lambda tmp: tmp, "no model in this folder \\(no config.json\\); expected a folder with config.json, or a hub id"),
])
def test_a_wrong_model_path_says_what_was_expected_before_anything_is_written(tmp_path, capsys, make, message):
    import re

    data = write_jsonl(tmp_path / "t.jsonl", [TEXT])
    out = tmp_path / "out"
    assert main(["sft", *quick(make(tmp_path), data, out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_an_empty_data_file_says_so(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "t.jsonl").write_text("\n")
    assert main(["sft", *quick(tiny_llama_dir, tmp_path / "t.jsonl", tmp_path / "out")]) == 2
    assert "t.jsonl: the file is empty" in capsys.readouterr().err


def test_a_diverging_lr_ends_with_an_error_naming_it(tmp_path, pretrained_dir, capsys):
    from .tiny_models import PRETRAIN_TEXT

    sentences = [s.strip() + " ." for s in PRETRAIN_TEXT.split(" . ") if s.strip()]
    rows = [{"text": s.replace("big", "small").replace("red", "green")} for s in sentences] * 8
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out"
    args = quick(pretrained_dir, data, out, "--max_steps", "220", "--learning_rate", "1e6", "--save_steps", "150",
                 "--per_device_train_batch_size", "4", "--debug")
    args.remove("--debug")
    assert main(["sft", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged by step 200") and "--learning_rate 1e+06 is too high" in err
    assert not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in out.glob("*checkpoint-*")] == ["diverged-checkpoint-150"]


def test_sigterm_saves_the_step_and_the_adapter_and_resumes_bit_identically(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"the {w} is big and the dog is small ."} for w in
                                              "cat dog bird fish cow horse robot sun".split()])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    common = ["--max_steps", "400", "--save_strategy", "no", "--lr_scheduler_type", "constant",
              "--logging_steps", "1", "--disable_tqdm", "true"]
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "adaprelora_diffusion.llm", "sft", *quick(tiny_llama_dir, data, out, *common)]
    log = tmp_path / "stdout.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        # SIGTERM once the first step is logged: a fixed wait could land before the handler or after the last
        # step (the 400 tiny steps take seconds), whatever the machine's speed
        while time.time() < deadline and proc.poll() is None and "'loss'" not in log.read_text():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    stdout = log.read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr
    assert stdout.strip().splitlines()[-1].startswith("stopped early: ")
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 400 and (out / "adapter_model.safetensors").is_file()
    saved = load_file(out / "adapter_model.safetensors")
    resumed = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = run("sft", quick(tiny_llama_dir, data, tmp_path / "straight", *common))
    assert reference.trainer.state.global_step == 400
    one = load_file(out / "adapter_model.safetensors")
    two = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(saved[k], one[k]) for k in one)  # the stop's adapter was the partial one


def test_deepspeed_is_refused_before_anything_loads_whether_or_not_it_is_installed(tmp_path, tiny_llama_dir, capsys):
    """Parsing --deepspeed imports DeepSpeed; the refusal comes first, so its absence is not the error shown."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    data = write_jsonl(tmp_path / "text.jsonl", [TEXT] * 4)
    assert main(["sft", *quick(tiny_llama_dir, data, tmp_path / "out", "--deepspeed", str(config))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --deepspeed with --optimizer adaprelora: DeepSpeed ZeRO gives the optimizer flat")
    assert "FSDP2" in err and "--optimizer adamw" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
