import json

from tests.benchmarks import load_benchmark

load = load_benchmark


def test_step_benchmark_prints_a_table_and_counts_state_exactly(tmp_path, capsys):
    bench = load("optimizer_step")
    out = tmp_path / "step.json"
    bench.main(["--ranks", "2", "--iters", "1", "--warmup", "0", "--tokens", "4",
                "--optimizers", "adamw", "adaprelora[sketch]", "lorapro", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| 2 | adaprelora[sketch] |" in printed and "device: CPU" in printed
    payload = json.loads(out.read_text())
    rows = {r["optimizer"]: r for r in payload["results"]}
    shapes = bench.sd15_attention_projection_shapes()
    r = 2
    floats = sum((i + o) * (r + 1) + 1 for _, i, o in shapes)  # momenta, statistics, one step counter per pair
    assert rows["adaprelora[sketch]"]["state_bytes"] == 4 * floats
    assert rows["adamw"]["state_bytes"] == 4 * sum(2 * (i + o) * r + 2 for _, i, o in shapes)
    assert rows["lorapro"]["state_bytes"] == 4 * len(shapes)  # a step counter only
    assert all(row["step_ms"] > 0 for row in rows.values())
