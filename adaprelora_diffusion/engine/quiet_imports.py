"""Silence transformers' "``<X>ImageProcessor`` requires torchvision" notices where they come from.

Importing diffusers' pipelines makes transformers resolve ``CLIPImageProcessor`` (the safety
checker's feature extractor) and ``SiglipImageProcessor`` (IP-Adapter); without torchvision, which
this project never installs, its lazy module falls back to the PIL classes and logs a notice once
per name per process (transformers/utils/import_utils.py, ``warning_once``). Nothing here uses an
image processor, so the notice is noise. ``quiet_image_processor_fallback()`` resolves both names
once, inside a filter that drops only that notice: transformers then caches the resolved classes
and its warn-once record, so no later import in the process (diffusers' own, a test's, a user's)
prints it. Every module that imports diffusers pipelines calls it first.
"""

from __future__ import annotations

import contextlib
import logging
import re

__all__ = ["quiet_image_processor_fallback", "no_image_processor_fallback_notice"]

_NOTICE = re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`")
_IMPORT_LOGGER = "transformers.utils.import_utils"
_NAMES = ("CLIPImageProcessor", "SiglipImageProcessor")
_done = False


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOTICE.match(record.getMessage())


@contextlib.contextmanager
def no_image_processor_fallback_notice():
    """Drop that notice (only it, only from transformers' import machinery's logger) inside this block."""
    import_logger = logging.getLogger(_IMPORT_LOGGER)
    notice_filter = _DropNotice()
    import_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        import_logger.removeFilter(notice_filter)


def quiet_image_processor_fallback() -> None:
    """Resolve transformers' image-processor names once per process with the notice dropped (see above)."""
    global _done
    if _done:
        return
    with no_image_processor_fallback_notice():
        import transformers

        for name in _NAMES:
            getattr(transformers, name, None)
    _done = True
