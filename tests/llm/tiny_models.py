"""Tiny causal LMs (Llama, GPT-2) with a word-level tokenizer and a chat template, built from configs.

Nothing is downloaded: each model is built from a config with a fixed seed and saved with
`save_pretrained`, so the tests load it through `from_pretrained` exactly as a user's model.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a an is was and or not to of in on at it he she they we you i my your this that "
         "cat dog bird fish cow horse robot sun moon star tree red blue green big small fast slow "
         "hello hi yes no please thanks what who where why how good bad say answer question tell me "
         "one two three four five six seven eight nine ten plus minus equals sky sea").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PUNCT = [".", ",", "?", "!", ":"]

#: the assistant turn sits inside {% generation %} so transformers can mask everything else.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %} "
    "{% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + ROLE_TOKENS + PUNCT + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=ROLE_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random tiny causal LM of ``arch`` ("llama" or "gpt2") and its tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=128, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


PRETRAIN_TEXT = ("the cat is big and the dog is small . the bird is fast and the fish is slow . "
                 "one plus two equals three . the sun is red and the sky is blue . ")


def save_pretrained_tiny_model(folder: Path, steps: int = 150, seed: int = 0) -> Path:
    """The tiny Llama trained (all weights, AdamW) on a few fixed sentences: a base model whose loss is
    well below uniform, so a diverged adapter shows as a loss far above it. About 3 s on one CPU core."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(Path(folder), "llama", seed)
    tok = build_tokenizer()
    ids = torch.tensor(tok(PRETRAIN_TEXT * 4).input_ids)
    windows = ids.unfold(0, 24, 4)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(steps):
            batch = windows[torch.randint(len(windows), (8,))]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(folder)
    return folder
