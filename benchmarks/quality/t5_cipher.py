"""T5: prompt -> completion adaptation of a tiny causal LM (a substitution cipher), completion-only loss.

Every example is ``prompt SEP completion``: the prompt is ``prompt_len`` symbols drawn with
Zipf-like frequencies, the completion enciphers it symbol by symbol, ``completion[j] =
cipher[prompt[j]]``, except that each completion symbol is replaced by a uniformly random one with
probability ``noise`` (so the loss has a known floor above zero). A tiny Llama is pretrained
(cached, keyed by `CipherSpec`) on one cipher; LoRA then adapts it to a cipher that maps a
``change`` fraction of the symbols elsewhere. The loss is on the completion tokens only: the
labels are the input ids with every prompt position (the separator included) set to -100, as
TRL's SFTTrainer builds them for prompt-completion data (``completion_only_loss``), and the
model's own causal-LM loss (transformers' shift and ignore index) reduces them.

How it differs from T2 (next-token LM on a shifted Markov language, loss on every token): the
pretrained skill is an in-context lookup (each completion symbol needs the prompt symbol
``prompt_len + 1`` positions back, fetched by attention and mapped through the cipher), the loss
sees only completions, and the adaptation rewrites a deterministic token map whose rarest
symbols are seen a few dozen times in the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .harness import Instance
from .tasks import cached_pretraining, lm_from_state, lora_lm, spread_channel_scales

__all__ = [
    "CipherAdaptation", "CipherSpec", "changed_cipher", "completion_labels", "make_examples", "noise_floor",
    "pretrained_cipher_lm",
]


@dataclass(frozen=True)
class CipherSpec:
    """Everything that determines the pretrained weights (the cache key): the task (symbols,
    prompt length, symbol frequencies, noise, the pretraining cipher's seed), the model and
    its pretraining run. ``vocab`` and ``length`` are what `_make_lm` and
    `spread_channel_scales` read, as from T2's `PretrainSpec`."""

    symbols: int = 96
    prompt_len: int = 10
    zipf: float = 1.0
    noise: float = 0.1
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-3
    cipher_seed: int = 11
    seed: int = 0
    version: int = 1

    @property
    def vocab(self) -> int:
        return self.symbols + 1  # the symbols, then the separator

    @property
    def sep(self) -> int:
        return self.symbols

    @property
    def length(self) -> int:
        return 2 * self.prompt_len + 1


def symbol_probs(spec: CipherSpec) -> torch.Tensor:
    """Zipf-like frequencies p_k ~ (k + 1)^-zipf: symbol 0 is the most frequent."""
    p = torch.arange(1, spec.symbols + 1, dtype=torch.float64).pow(-spec.zipf)
    return (p / p.sum()).float()


def pretraining_cipher(spec: CipherSpec) -> torch.Tensor:
    return torch.randperm(spec.symbols, generator=torch.Generator().manual_seed(spec.cipher_seed))


def changed_cipher(cipher: torch.Tensor, change: float, seed: int) -> torch.Tensor:
    """A permutation equal to ``cipher`` except on a random ``change`` fraction of the symbols,
    each of which now maps to another of those symbols' old images (a cyclic shift among them,
    so every changed symbol really changes and the result is still a permutation)."""
    n = len(cipher)
    moved = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(change * n)]
    new = cipher.clone()
    if len(moved) >= 2:
        new[moved] = cipher[moved.roll(1)]
    return new


def make_examples(spec: CipherSpec, cipher: torch.Tensor, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences ``prompt SEP completion`` (noisy completions) and their clean completions."""
    L = spec.prompt_len
    prompt = torch.multinomial(symbol_probs(spec), count * L, replacement=True, generator=g).view(count, L)
    clean = cipher[prompt]
    flip = torch.rand(count, L, generator=g) < spec.noise
    noisy = torch.where(flip, torch.randint(spec.symbols, (count, L), generator=g), clean)
    sep = torch.full((count, 1), spec.sep, dtype=torch.long)
    return torch.cat([prompt, sep, noisy], dim=1), clean


def completion_labels(input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Causal-LM labels scoring the completion only: the input ids with the prompt and its
    separator (the first ``prompt_len + 1`` positions) set to -100, as TRL's SFTTrainer masks
    prompt-completion rows; the model shifts them by one itself."""
    labels = input_ids.clone()
    labels[:, : prompt_len + 1] = -100
    return labels


def noise_floor(spec: CipherSpec, input_ids: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean cross-entropy of the true conditional distribution on these completions: the clean
    symbol with probability 1 - noise + noise / symbols, any other with noise / symbols."""
    other = spec.noise / spec.symbols
    hit = input_ids[:, spec.prompt_len + 1 :] == clean
    return -torch.where(hit, torch.tensor(1.0 - spec.noise + other), torch.tensor(other)).log().mean().item()


def _completion_metrics(model: nn.Module, spec: CipherSpec, input_ids: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    out = model(input_ids=input_ids, labels=completion_labels(input_ids, spec.prompt_len))
    # position t predicts token t + 1: positions prompt_len .. 2 prompt_len - 1 predict the completion
    pred = out.logits[:, spec.prompt_len : 2 * spec.prompt_len].argmax(-1)
    right = pred == clean
    return {"loss": out.loss.item(), "token_accuracy": right.float().mean().item(),
            "exact_match": right.all(1).float().mean().item()}


def pretrained_cipher_lm(spec: CipherSpec, log=lambda s: None) -> dict[str, torch.Tensor]:
    """State dict of the LM pretrained on the spec's cipher (completion-only loss; cached, see
    `cached_pretraining`)."""
    cipher = pretraining_cipher(spec)

    def batch_loss(model, g):
        x, _ = make_examples(spec, cipher, spec.batch, g)
        return model(input_ids=x, labels=completion_labels(x, spec.prompt_len)).loss

    return cached_pretraining("T5", spec, batch_loss, log)


class CipherAdaptation:
    """T5: LoRA (rank r, attention + MLP projections) adapts the pretrained cipher LM to a cipher
    changed on a ``change`` fraction of the symbols, with the loss on completions only.

    Metrics: held-out completion ``loss`` (nats per completion token, noisy completions as
    trained on), ``token_accuracy`` and ``exact_match`` (every symbol of a completion right) of the
    greedy next-token prediction against the clean cipher (teacher forced). References: the noise
    floor of the loss (the true conditional's cross-entropy on the held-out set), and the
    pretrained model's loss and accuracies before LoRA. The pretrained weights are reparametrised
    exactly (`spread_channel_scales`) so the LoRA layers see channel scales spread
    ``channel_spread``-fold, as T2's. The held-out set is fixed by ``problem_seed``; the run
    seed sets the LoRA init and the training stream.

    Why it is built this way (calibrated on one seed; a first version could not rank optimizers):

    - 32 symbols with half (or all) of the cipher changed: AdamW, Adafactor and AdaPreLoRA all
      ended within 0.02 nats of the floor with exact match 1.0 in 150 steps, so 96 symbols with
      every one changed: the pretrained model starts confidently wrong (7.04 nats, above
      uniform's 4.56, accuracy 0) and a rank-4 LoRA must rewrite a 96-entry map: no optimizer
      reaches the floor (0.75) in the budget, the best ends ~0.18 above (with 400 steps
      Adafactor and AdaPreLoRA both stall at 0.85; rank 8 gains 0.05-0.2 at 150 steps);
    - Zipf frequencies: the most frequent symbol is ~100x as frequent as the rarest (~50
      occurrences in the budget's 24,000 prompt symbols), the uneven gradient scales of real data;
    - 150 steps of 16 examples (~5-8 s a run on one thread): AdamW 1.16, AdaPreLoRA 1.01 and
      Adafactor 0.93 on three fresh seeds, each gap several seed standard errors; with 100
      steps the gaps were larger but the models further from done.
    """

    name = "T5"
    description = "cipher prompt -> completion adaptation"
    metrics = ("loss", "token_accuracy", "exact_match")
    higher_is_better = ("token_accuracy", "exact_match")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def __init__(self, spec: CipherSpec = CipherSpec(), r=4, steps=150, batch=16, change=1.0, channel_spread=10.0,
                 eval_every=10, n_eval=256, problem_seed=0, log=lambda s: None):
        self.spec, self.r, self.steps, self.batch, self.eval_every = spec, r, steps, batch, eval_every
        self.state = spread_channel_scales(pretrained_cipher_lm(spec, log), spec, channel_spread, spec.cipher_seed + 3)
        self.cipher = changed_cipher(pretraining_cipher(spec), change, spec.cipher_seed + 1)
        g = torch.Generator().manual_seed(problem_seed)
        self.X_eval, self.clean_eval = make_examples(spec, self.cipher, n_eval, g)
        with torch.no_grad():
            before = _completion_metrics(lm_from_state(spec, self.state), spec, self.X_eval, self.clean_eval)
        self.reference = {"noise_floor_loss": noise_floor(spec, self.X_eval, self.clean_eval),
                          **{f"pretrained_{k}": v for k, v in before.items()}}

    def build(self, seed: int) -> Instance:
        model = lora_lm(self.spec, self.state, self.r, self.targets, seed)
        x, _ = make_examples(self.spec, self.cipher, self.steps * self.batch, torch.Generator().manual_seed(40_000 + seed))
        return Instance(model, (x, completion_labels(x, self.spec.prompt_len)))

    def train_step(self, inst: Instance, step: int) -> float:
        x, labels = inst.data
        sl = slice(step * self.batch, (step + 1) * self.batch)
        loss = inst.model(input_ids=x[sl], labels=labels[sl]).loss
        loss.backward()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, inst: Instance) -> dict[str, float]:
        return _completion_metrics(inst.model, self.spec, self.X_eval, self.clean_eval)
