import json

import torch

from tests.benchmarks import load_benchmark

load = load_benchmark

OPTIMIZERS = ["adamw", "adaprelora", "lorapro"]


def _independent_state_bytes(optimizer) -> int:
    """AdaPreLoRA's state counted without storage dedup: its stacked per-bucket tensors (which the
    per-parameter `state` entries are views into) plus any state of parameters outside the buckets."""
    in_buckets = {id(p) for b in optimizer._buckets for pair in b.pairs for p in (pair.A, pair.B)}
    stacks = [t for b in optimizer._buckets for t in b.state.values()]
    total = sum(t.numel() * t.element_size() for t in stacks)
    for p, state in optimizer.state.items():
        if id(p) in in_buckets:
            for value in state.values():  # a view into one of the stacks, never its own storage
                assert any(value.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in stacks)
        else:
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def test_step_benchmark_interleaves_repeats_and_renders_the_same_table(tmp_path, capsys):
    bench = load("optimizer_step")
    out = tmp_path / "step.json"
    steps, repeats, r = 2, 2, 2
    bench.main(["--ranks", str(r), "--steps", str(steps), "--warmup", "0", "--repeats", str(repeats), "--tokens", "4",
                "--optimizers", *OPTIMIZERS, "--starts", "b0", "trained", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "device: CPU" in printed and f"{repeats} repeats" in printed and f"{steps} timed steps" in printed
    table_rows = [line for line in printed.splitlines() if line.startswith(f"| {r} |")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table_rows]
    assert sorted((c[1], c[2]) for c in cells) == sorted((o, s) for o in OPTIMIZERS for s in ("b0", "trained"))
    assert all(c[4] == "1.00 [1.00-1.00]" for c in cells if c[1] == "adamw")

    payload = json.loads(out.read_text())
    rows = {(row["optimizer"], row["start"]): row for row in payload["results"]}
    assert len(rows) == len(payload["results"]) == 2 * len(OPTIMIZERS)
    for row in rows.values():
        assert len(row["step_ms_raw"]) == repeats and all(len(times) == steps for times in row["step_ms_raw"])
        assert sum(len(times) for times in row["backward_ms_raw"]) == steps * repeats
        assert all(t > 0 for times in row["step_ms_raw"] for t in times)
        assert len(row["ratios_per_repeat"]) == repeats and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert all(rows["adamw", s]["ratio"] == 1.0 for s in ("b0", "trained"))

    # --render reprints the same header and table from the saved file, measuring nothing
    bench.main(["--render", str(out)])
    assert capsys.readouterr().out == printed

    shapes = bench.sd15_attention_projection_shapes()
    for start in ("b0", "trained"):
        assert rows["adamw", start]["state_bytes"] == 4 * sum(2 * (i + o) * r + 2 for _, i, o in shapes)
        assert rows["lorapro", start]["state_bytes"] == 4 * len(shapes)  # a step counter only
    # the cached frozen output changes nothing: same loss and gradients as computing x @ W^T
    weights = bench.base_weights(shapes, torch.device("cpu"), torch.float32)
    inputs = bench.make_inputs(weights, 4)
    plain, cached = bench.build(weights, r, "trained"), bench.build(weights, r, "trained", bench.base_outputs(weights, inputs))
    losses = [m(inputs) for m in (plain, cached)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (plain, cached)]
    assert all(torch.equal(g, h) for g, h in zip(*grads))
    # AdaPreLoRA's layout may change: count an optimizer built and stepped like the benchmark's, independently
    model = bench.build(weights, r, "trained")
    optimizer = bench.make("adaprelora", model)
    bench.iteration(model, optimizer, inputs, torch.device("cpu"))
    expected = _independent_state_bytes(optimizer)
    optimizer.close()
    assert bench.state_bytes(optimizer) == expected
    for start in ("b0", "trained"):
        assert rows["adaprelora", start]["state_bytes"] == expected
        assert 0 < expected < rows["adamw", start]["state_bytes"]
