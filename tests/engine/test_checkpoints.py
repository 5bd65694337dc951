"""engine.checkpoints: manifests, verification, fallback, a full disk, leftovers of a killed run."""

import logging

import pytest
import torch

import adaprelora_diffusion.engine.checkpoints as ck


def _objects(value=1.0):
    w = torch.nn.Parameter(torch.full((3, 2), value))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"w": w}, opt, sched


def _save(out, step, value=1.0, **kw):
    params, opt, sched = _objects(value)
    return ck.save_checkpoint(out, ck.LoopState(global_step=step), params=params, optimizer=opt, lr_scheduler=sched, **kw)


def test_roundtrip_with_run_config(tmp_path):
    params, opt, sched = _objects(2.0)
    path = ck.save_checkpoint(tmp_path, ck.LoopState(global_step=3), params=params, optimizer=opt, lr_scheduler=sched,
                              run_config={"learning_rate": 1e-4})
    ck.verify_checkpoint(path)
    assert ck.read_run_config(path) == {"learning_rate": 1e-4}
    fresh, opt2, sched2 = _objects(0.0)
    state = ck.load_checkpoint(path, params=fresh, optimizer=opt2, lr_scheduler=sched2)
    assert state.global_step == 3 and torch.equal(fresh["w"].detach(), params["w"].detach())
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, damage, caplog):
    _save(tmp_path, 2)
    bad = _save(tmp_path, 4)
    target = bad / "optimizer.pt"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING):
        assert ck.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert "optimizer.pt" in caplog.text and "checkpoint-4" in caplog.text
    with pytest.raises(ck.CheckpointError, match="optimizer.pt"):
        ck.resolve_checkpoint(tmp_path, str(bad))  # an explicit path is never silently replaced


def test_all_damaged_is_an_error_and_none_is_a_fresh_start(tmp_path):
    assert ck.resolve_checkpoint(tmp_path, "latest") is None
    path = _save(tmp_path, 1)
    (path / "lora_params.safetensors").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="Every checkpoint"):
        ck.resolve_checkpoint(tmp_path, "latest")


def test_full_disk_raised_by_torch_cleans_up_and_keeps_the_previous_one(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_save = torch.save

    def full(obj, f, *a, **k):  # what torch raises on ENOSPC: a RuntimeError, not an OSError
        if str(f).endswith("scheduler.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.CheckpointError, match="checkpoint-1 is intact.*Free disk space"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no hidden partial folder


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / ".checkpoint-2.tmp-abc").mkdir()
    (tmp_path / ".checkpoint-2.tmp-abc" / "optimizer.pt").write_bytes(b"partial")
    assert ck.remove_stale_temporaries(tmp_path) == [".checkpoint-2.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
