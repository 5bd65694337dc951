"""engine.atomic: a failed write leaves the old file or folder as it was, and no temporary behind."""

import pytest

from adaprelora_diffusion.engine.atomic import atomic_write, atomic_write_text, staged_dir


def test_failed_file_write_keeps_the_old_content_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staged_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with staged_dir(target) as d:
        (d / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as d:
            (d / "x").write_text("2")
            raise RuntimeError("killed")
    assert (target / "x").read_text() == "1"
    with staged_dir(target) as d:
        (d / "y").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["y"]  # the old folder is gone, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_concurrent_builder_result_is_accepted_only_when_asked(tmp_path, monkeypatch):
    import adaprelora_diffusion.engine.atomic as atomic

    target = tmp_path / "cache"

    def lost_race(staging, tgt):
        tgt.mkdir(exist_ok=True)
        (tgt / "theirs").write_text("done")
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(atomic, "replace_dir", lost_race)
    with staged_dir(target, accept_existing=lambda p: (p / "theirs").is_file()) as d:
        (d / "mine").write_text("x")
    assert (target / "theirs").is_file()
    with pytest.raises(OSError):
        with staged_dir(target, accept_existing=lambda p: False) as d:
            (d / "mine").write_text("x")
