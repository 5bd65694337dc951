"""benchmarks/llm_throughput.py on tiny shapes: it times real LoRA training steps and reports every optimizer."""

import argparse

import torch

from . import load_benchmark

TINY = ["--hidden", "32", "--mlp", "48", "--tokens", "8", "--steps", "2", "--warmup", "1"]


def test_the_stack_has_seven_lora_pairs_per_block_and_trains():
    bench = load_benchmark("llm_throughput")
    from adaprelora_diffusion.optim import find_lora_pairs

    model = bench.build(layers=2, hidden=32, mlp=48, rank=4, dtype=torch.float32, device="cpu")
    pairs, others = find_lora_pairs(model)
    assert len(pairs) == 14 and not others
    assert {p.shape for p in pairs} == {(32, 32, 4), (48, 32, 4), (32, 48, 4)}


def test_measure_each_optimizer_and_render_the_table():
    bench = load_benchmark("llm_throughput")
    args = argparse.Namespace(layers=1, hidden=32, mlp=48, tokens=8, steps=2, warmup=1, dtype="float32", device="cpu", repeats=1)
    memory = [bench.measure(name, 4, args) for name in bench.OPTIMIZERS]
    times = bench.paired(4, list(bench.OPTIMIZERS), args)
    assert {n: len(t) for n, t in times.items()} == {n: 2 for n in bench.OPTIMIZERS}
    results = [bench.combine([m], times[m["optimizer"]], times["adamw"], args.tokens) for m in memory]
    assert all(r["tokens_per_s"] > 0 and r["training_mib"] >= 0 for r in results) and results[0]["vs_adamw"] == 1.0
    state = {r["optimizer"]: r["state_mib"] for r in results}
    # per module: AdaPreLoRA's m + n statistics, Adafactor's m + n + 2r (each factor's rows and columns), AdamW's 2(m + n)r
    assert state["adaprelora"] < state["adafactor"] < state["adamw"]
    table = bench.render(results, args)
    assert "| 4 | adamw |" in table and "| 4 | adaprelora |" in table and "1.00x" in table


def test_main_runs_each_config_in_its_own_process(tmp_path, capsys):
    bench = load_benchmark("llm_throughput")
    results = bench.main([*TINY, "--ranks", "2", "--optimizers", "adamw", "--json", str(tmp_path / "t.json")])
    assert [(r["optimizer"], r["rank"], len(r["step_s"])) for r in results] == [("adamw", 2, 2)]
    assert (tmp_path / "t.json").is_file() and "| 2 | adamw |" in capsys.readouterr().out
