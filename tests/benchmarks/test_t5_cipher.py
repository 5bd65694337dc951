"""T5 (cipher prompt -> completion): the quick variant end to end, the exact channel-spread
reparametrisation of its pretrained model, and the completion-only loss mask."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.quality.t5_cipher import (
    CipherAdaptation,
    CipherSpec,
    changed_cipher,
    completion_labels,
    make_examples,
    noise_floor,
    pretrained_cipher_lm,
)
from benchmarks.quality.tasks import _make_lm, lm_from_state
from tests.benchmarks import load_benchmark

SPEC = CipherSpec(symbols=16, prompt_len=4, hidden=32, steps=40, batch=16)  # the --quick spec


@pytest.fixture
def task(cache):
    return CipherAdaptation(SPEC, steps=6, batch=4, eval_every=3, n_eval=16)


def test_t5_quick_end_to_end(tmp_path, cache):
    bench = load_benchmark("optimizer_quality")
    assert "T5" in bench.TASKS and "T5" not in bench.OPT_IN and "T5" in bench.TASK_GRIDS
    out = tmp_path / "out"
    payload = bench.main(["--quick", "--tasks", "T5", "--optimizers", "adamw", "adaprelora", "--out", str(out)])
    torch.set_num_threads(1)
    task = json.loads((out / "optimizer_quality.json").read_text())["tasks"]["T5"]
    assert payload["tasks"].keys() == {"T5"} and task["metrics"] == ["loss", "token_accuracy", "exact_match"]
    assert task["higher_is_better"] == ["token_accuracy", "exact_match"]
    ref = task["reference"]
    assert all(math.isfinite(v) for v in ref.values())
    # the changed cipher moves every symbol: the pretrained model starts far above the floor, never right
    assert ref["pretrained_loss"] > ref["noise_floor_loss"] + 1.0 and ref["pretrained_token_accuracy"] < 0.2
    assert list(cache.glob("quality/t5_pretrained_*.pt")) and not list(cache.glob("quality/*.tmp*"))
    for c in task["configs"]:
        curve = c["curve"]["mean"]
        assert c["curve"]["steps"][-1] == task["steps"] and curve[-1] < ref["pretrained_loss"]
        assert ref["noise_floor_loss"] < c["final"]["loss"]["mean"] == pytest.approx(curve[-1])
        for m in ("token_accuracy", "exact_match"):
            assert 0.0 <= c["final"][m]["mean"] <= 1.0
    assert "| T5 (loss) |" in (out / "optimizer_quality.md").read_text()


def test_pretrained_weights_are_cached_and_reused(cache):
    first = pretrained_cipher_lm(SPEC)
    path, = cache.glob("quality/t5_pretrained_*.pt")
    stamp = path.stat().st_mtime_ns
    again = pretrained_cipher_lm(SPEC)
    assert path.stat().st_mtime_ns == stamp and all(torch.equal(first[k], again[k]) for k in first)
    pretrained_cipher_lm(CipherSpec(symbols=16, prompt_len=4, hidden=32, steps=41, batch=16))
    assert len(list(cache.glob("quality/t5_pretrained_*.pt"))) == 2  # any spec change is a new key


def test_channel_spread_keeps_the_pretrained_function(task):
    """The LoRA layers see a reparametrisation of the pretrained model: same logits, spread scales."""
    plain = _make_lm(SPEC).eval()
    plain.load_state_dict(pretrained_cipher_lm(SPEC))
    spread = lm_from_state(SPEC, task.state)
    gain = spread.model.layers[0].input_layernorm.weight / plain.model.layers[0].input_layernorm.weight
    assert gain.max() / gain.min() > 3  # the scales really are spread
    with torch.no_grad():
        torch.testing.assert_close(spread(input_ids=task.X_eval).logits, plain(input_ids=task.X_eval).logits,
                                   atol=1e-4, rtol=1e-4)


def test_loss_is_on_completion_tokens_only(task):
    inst = task.build(0)
    x, labels = inst.data
    x, labels = x[:8], labels[:8]
    L = SPEC.prompt_len
    assert (labels[:, : L + 1] == -100).all() and torch.equal(labels[:, L + 1 :], x[:, L + 1 :])
    with torch.no_grad():
        logits = inst.model(input_ids=x).logits
        loss = inst.model(input_ids=x, labels=labels).loss
        # labels built from other prompts (same completions): the loss does not change
        other = x.clone()
        other[:, :L] = (x[:, :L] + 1 + torch.arange(L)) % SPEC.symbols
        torch.testing.assert_close(inst.model(input_ids=x, labels=completion_labels(other, L)).loss, loss)
        # ...while one changed completion label does
        flipped = labels.clone()
        flipped[0, -1] = (flipped[0, -1] + 1) % SPEC.symbols
        assert inst.model(input_ids=x, labels=flipped).loss != loss
    # and it is the mean cross-entropy of exactly the completion positions (position t predicts t + 1)
    manual = F.cross_entropy(logits[:, L : 2 * L].reshape(-1, SPEC.vocab), x[:, L + 1 :].reshape(-1))
    torch.testing.assert_close(loss, manual)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, SPEC.vocab), x[:, 1:].reshape(-1))
    assert not torch.isclose(full, manual)


def test_changed_cipher_and_data():
    cipher = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for change, moved in ((1.0, 40), (0.5, 20), (0.0, 0)):
        new = changed_cipher(cipher, change, seed=1)
        assert sorted(new.tolist()) == list(range(40)) and (new != cipher).sum() == moved
    spec = CipherSpec(symbols=40, prompt_len=6, noise=0.2)
    x, clean = make_examples(spec, cipher, 4000, torch.Generator().manual_seed(2))
    assert x.shape == (4000, spec.length) and (x[:, spec.prompt_len] == spec.sep).all()
    assert torch.equal(clean, cipher[x[:, : spec.prompt_len]])
    hits = (x[:, spec.prompt_len + 1 :] == clean).float().mean().item()
    assert hits == pytest.approx(1 - spec.noise + spec.noise / spec.symbols, abs=0.01)
    counts = torch.bincount(x[:, : spec.prompt_len].reshape(-1), minlength=spec.symbols)
    assert counts[0] > 5 * counts[-1]  # Zipf-like: symbol 0 is frequent, the last one rare


def test_noise_floor_is_the_true_conditionals_cross_entropy():
    spec = CipherSpec(symbols=12, prompt_len=5, noise=0.3)
    cipher = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    x, clean = make_examples(spec, cipher, 500, torch.Generator().manual_seed(1))
    true = torch.full((500, 5, 12), spec.noise / 12).scatter_add(-1, clean[..., None], torch.full((500, 5, 1), 1 - spec.noise))
    expected = F.cross_entropy(true.log().reshape(-1, 12), x[:, 6:].reshape(-1)).item()
    assert noise_floor(spec, x, clean) == pytest.approx(expected, rel=1e-6)
