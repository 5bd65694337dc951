from .test_optimizer_step import load


def test_throughput_benchmark_times_the_real_loop(tmp_path, tiny_pipeline_dir, monkeypatch, capsys):
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tiny_pipeline_dir.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load("train_throughput")
    results, failed = bench.main(["--steps", "3", "--warmup", "1", "--optimizers", "adamw", "adaprelora[sketch]",
                                  "--json", str(tmp_path / "t.json")])
    assert failed == []
    assert [r["optimizer"] for r in results] == ["adamw", "adaprelora[sketch]"]
    assert all(r["steps_per_s"] > 0 and r["peak_mib"] > 0 for r in results)
    assert "| adaprelora[sketch] |" in capsys.readouterr().out


def test_throughput_benchmark_runs_sdxl_and_a_failed_run_exits_nonzero(tmp_path, tiny_sdxl_pipeline_dir, monkeypatch, capsys):
    import subprocess
    import sys

    monkeypatch.setenv("ADAPRELORA_CACHE", str(tiny_sdxl_pipeline_dir.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load("train_throughput")
    results, failed = bench.main(["--model", "tiny-sdxl", "--steps", "2", "--warmup", "1", "--optimizers", "adaprelora[sketch]"])
    assert failed == [] and results[0]["steps_per_s"] > 0
    # A broken run (rank 0 is invalid) is reported and makes the script exit 1, not print an empty table.
    done = subprocess.run([sys.executable, bench.__file__, "--steps", "2", "--warmup", "1", "--rank", "0",
                           "--optimizers", "adamw"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "adamw: failed" in done.stderr
