"""Assistant-turn loss masks for chat templates without ``{% generation %}`` markers.

TRL masks the assistant turns of ``{"messages"}`` rows through transformers'
``return_assistant_tokens_mask``, which needs ``{% generation %}`` markers in the chat template;
for templates it knows, TRL swaps in a marked copy, and for any other it stops ("patching is not
supported for this template"). Many fine-tuned models ship such templates. For them this module
finds the turns by rendering: for each assistant message, the conversation up to it with
``add_generation_prompt=True`` (where the reply starts) and up to and including it (where the
turn ends, with its end-of-turn tokens, so the model learns to stop). Both must be token
prefixes of the whole conversation; a template that renders earlier turns differently once more
follow cannot be masked this way, and the error says what to do instead.

Used by `AdaPreLoRASFTTrainer`: it tokenizes such rows to ``input_ids`` and ``assistant_masks``,
the columns TRL's own masking produces, so packing, truncation and the collator treat them alike.
"""

from __future__ import annotations

from typing import Any

__all__ = ["needs_turn_masks", "turn_masks", "NotPrefixPreserving"]


class NotPrefixPreserving(ValueError):
    """A chat template whose rendering of a conversation's start changes with what follows."""


def needs_turn_masks(chat_template: str | dict | None) -> bool:
    """True when TRL cannot mask this template's assistant turns itself: no ``{% generation %}`` markers
    and no training template of TRL's for it."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if chat_template is None or has_generation_markers(chat_template):
        return False

    class _Holder:  # get_training_chat_template reads only these from the tokenizer
        def __init__(self, template):
            self.chat_template = template

        def __getattr__(self, name):
            raise AttributeError(name)

    try:
        get_training_chat_template(_Holder(chat_template))
    except ValueError:
        return True  # TRL has no patch for it: we mask by rendering
    except (AttributeError, TypeError):
        return True  # TRL would need more of the tokenizer to judge: our way works for any template
    return False


def _ids(tokenizer, messages: list[dict[str, Any]], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    return list(out[0] if out and isinstance(out[0], list) else out)


def turn_masks(tokenizer, messages: list[dict[str, Any]], where: str = "a row") -> dict[str, list[int]]:
    """``{"input_ids", "assistant_masks"}`` of one conversation: 1 on each assistant turn's tokens."""
    full = _ids(tokenizer, messages)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        end = _ids(tokenizer, messages[: i + 1])
        for part, ids in (("before", start), ("through", end)):
            if full[: len(ids)] != ids:
                raise NotPrefixPreserving(
                    f"{where}: the chat template renders the conversation {part} assistant message {i} differently "
                    "from the start of the whole conversation, so the assistant turns cannot be found. Pass a template "
                    "with {% generation %} markers (--chat_template_path FILE.jinja), or train on every token with "
                    "--assistant_only_loss false.")
        for k in range(len(start), len(end)):
            mask[k] = 1
    return {"input_ids": full, "assistant_masks": mask}
