"""The model card (README.md) of an adaprelora-llm output folder: how to load it, how it was trained, its eval."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_model_card"]


def render_model_card(*, base_model: str, command: str, data: str, data_format: str, settings: dict[str, Any],
                      metrics: dict[str, float], steps: int) -> str:
    loader = "AutoModelForSequenceClassification" if command == "classify" else "AutoModelForCausalLM"
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    evals = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items()) or "| (no eval data) | |"
    return f"""---
base_model: {base_model}
library_name: peft
tags: [lora, adaprelora, {"text-classification" if command == "classify" else "sft"}]
---

# LoRA adapter for {base_model}

Trained with `adaprelora-llm {command}` for {steps} optimizer steps on `{data}` ({data_format} rows).

```python
from peft import PeftModel
from transformers import {loader}, AutoTokenizer

base = {loader}.from_pretrained({json.dumps(base_model)})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

## Evaluation

| metric | value |
|---|---:|
{evals}

## Training settings

| setting | value |
|---|---|
{rows}
"""
