from .test_optimizer_step import load


def test_throughput_benchmark_times_the_real_loop(tmp_path, tiny_pipeline_dir, monkeypatch, capsys):
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tiny_pipeline_dir.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load("train_throughput")
    results = bench.main(["--steps", "3", "--warmup", "1", "--optimizers", "adamw", "adaprelora[sketch]",
                          "--json", str(tmp_path / "t.json")])
    assert [r["optimizer"] for r in results] == ["adamw", "adaprelora[sketch]"]
    assert all(r["steps_per_s"] > 0 and r["peak_mib"] > 0 for r in results)
    assert "| adaprelora[sketch] |" in capsys.readouterr().out
