"""Training data for ``adaprelora-llm``: read with `datasets`, each row checked against the format users have.

Formats (TRL's own dataset types, which `SFTTrainer` then tokenizes, templates and masks):

* ``{"text": ...}``: language modelling, loss on every token;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template, loss on the assistant turns only;
* ``{"prompt": ..., "completion": ...}``: loss on the completion only;
* ``{"text": ..., "label": ...}``: sequence classification (``classify``).

datasets reads the files and infers one schema, so rows of another shape come back as nulls
and a torn line as an opaque generation error; the row checks here turn both into an error that
names the file and the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DataError", "MissingSplit", "SFT_FORMATS", "load_rows", "detect_format", "check_rows", "load_training_data", "label_names"]

#: format name -> the fields a row of it has
SFT_FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
CLASSIFY_FORMAT = ("text", "label")
_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_ROLES = ("system", "user", "assistant", "tool")
_EXAMPLE = ('{"text": "..."}, {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
            'or {"prompt": "...", "completion": "..."}')


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and the fix."""


class MissingSplit(DataError):
    """A `--dataset_name` dataset without the asked-for split."""


def load_rows(path: str | Path):
    """A `datasets.Dataset` from a .jsonl/.json, .csv or .parquet file."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_READERS)}.")
    if not path.read_bytes().strip():
        raise DataError(f"{path}: the file is empty; it needs one row per line (jsonl) or a table with a header.")
    try:
        rows = datasets.load_dataset(reader, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in DatasetGenerationError without the row
        reason = _first_bad_line(path) or str(err).strip() or type(err).__name__
        raise DataError(f"{path}: could not be read: {reason}") from err
    if len(rows) == 0:
        raise DataError(f"{path}: has no rows.")
    return rows


def _first_bad_line(path: Path) -> str | None:
    """For JSON lines: which line does not parse (datasets does not say)."""
    if _READERS.get(path.suffix.lower()) != "json" or path.suffix.lower() != ".jsonl":
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError as err:
                    return f"line {number} is not valid JSON ({err})"
                if not isinstance(value, dict):
                    return f"line {number} is a JSON {type(value).__name__}, not an object like {_EXAMPLE}"
    return None


def detect_format(first_row: dict[str, Any], source: str) -> str:
    """The SFT format of the file: that of its first row (`check_rows` then holds every row to it)."""
    present = [k for k, v in first_row.items() if v is not None]
    for name, fields in SFT_FORMATS.items():
        if all(f in present for f in fields):
            return name
    raise DataError(f"{source}: rows need the fields of one format: {_EXAMPLE}; row 1 has {sorted(present)}.")


def _check_messages(value: Any, where: str, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}, got {value!r:.80}.")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {'/'.join(_ROLES)}, 'content': text}}, "
                            f"got {message!r:.80}.")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: no assistant message, so nothing to learn (the loss is on the assistant turns only).")


def check_rows(rows, fmt: str, source: str) -> None:
    """Every row has its format's fields with the right types and no other format's fields."""
    fields = SFT_FORMATS.get(fmt, CLASSIFY_FORMAT)
    others = {f for fs in SFT_FORMATS.values() for f in fs} - set(fields) - ({"text"} if fmt == "classify" else set())
    present_others = [c for c in rows.column_names if c in others]
    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        for name in present_others:
            if row[name] is not None:
                raise DataError(f"{where}: has {name!r}, but the file's rows are in the {fmt} format "
                                f"({', '.join(fields)}); one file holds one format.")
        for name in fields:
            value = row[name]
            if value is None:
                raise DataError(f"{where}: missing {name!r} (the file's rows are in the {fmt} format: {', '.join(fields)}).")
            if name == "messages" or (name in ("prompt", "completion") and isinstance(value, list)):
                _check_messages(value, f"{where} {name!r}", need_assistant=name == "messages")
            elif name == "label":
                if not isinstance(value, (int, str)) or isinstance(value, bool):
                    raise DataError(f"{where}: 'label' must be an integer or a string, got {value!r:.80}.")
            elif not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: {name!r} must be non-empty text, got {value!r:.80}.")


def load_training_data(path: str | Path | None = None, *, dataset_name: str | None = None, dataset_config: str | None = None,
                       split: str = "train", classify: bool = False, expect: str | None = None):
    """Read and check one split; returns ``(rows, format)``. ``expect`` is the train split's format
    (an eval file must have the same)."""
    if path is not None:
        rows, source = load_rows(path), str(path)
    else:
        import datasets

        try:
            rows = datasets.load_dataset(dataset_name, name=dataset_config, split=split)
        except ValueError as err:
            if "Unknown split" in str(err):  # datasets' own wording; the other splits exist
                raise MissingSplit(f"--dataset_name {dataset_name} has no split {split!r} ({err}).") from err
            raise DataError(f"--dataset_name {dataset_name} (split {split!r}) could not be loaded: {err}") from err
        except Exception as err:
            raise DataError(f"--dataset_name {dataset_name} (split {split!r}) could not be loaded: {err}") from err
        source = f"{dataset_name}[{split}]"
    if classify:
        missing = [f for f in CLASSIFY_FORMAT if f not in rows.column_names]
        if missing:
            raise DataError(f'{source}: classify needs rows {{"text": ..., "label": ...}}; missing {missing}, '
                            f"found {sorted(rows.column_names)}.")
        fmt = "classify"
    else:
        fmt = detect_format(rows[0], source)
    if expect is not None and fmt != expect:
        raise DataError(f"{source}: rows are in the {fmt} format, the training data in the {expect} format; use one format.")
    check_rows(rows, fmt, source)
    return rows, fmt


def label_names(*splits) -> list:
    """The sorted distinct labels over the splits (ints sort numerically, strings alphabetically)."""
    labels = sorted({label for rows in splits if rows is not None for label in rows["label"]}, key=lambda v: (str(type(v)), v))
    if len({type(v) for v in labels}) > 1:
        raise DataError(f"labels mix integers and strings ({labels[:6]}); use one kind.")
    return labels
