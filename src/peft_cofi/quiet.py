"""Keep DeepSpeed's start-up notice out of commands that never use DeepSpeed.

When DeepSpeed is installed, transformers' ``PreTrainedModel.save_pretrained`` unwraps the model through accelerate's
``extract_model_from_parallel``, which imports ``deepspeed`` to test for a ``DeepSpeedEngine``. On a machine without
a GPU, DeepSpeed's import then logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
to detect it." on stdout, in the middle of a merge that has nothing to do with DeepSpeed. :func:`quiet_deepspeed_probe`
drops that one record while this package saves a full model. It changes nothing else: DeepSpeed still detects its
accelerator as usual (setting ``DS_ACCELERATOR`` instead would fix DeepSpeed's choice for the rest of the process),
and its other messages pass.

Example:
    >>> import logging
    >>> with quiet_deepspeed_probe():
    ...     logging.getLogger("DeepSpeed").filter(logging.makeLogRecord({"msg": CPU_NOTICE + ". If you have GPU"}))
    False
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging creates its logger under this name
CPU_NOTICE = "Setting accelerator to CPU"


class _DropCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CPU_NOTICE not in record.getMessage()


@contextlib.contextmanager
def quiet_deepspeed_probe() -> Iterator[None]:
    """Drop DeepSpeed's "Setting accelerator to CPU" notice inside the ``with`` block (see the module docstring).

    The filter sits on the ``DeepSpeed`` logger object itself, which DeepSpeed's logger factory reuses when the
    import happens inside the block, so it works whether or not DeepSpeed was imported before.

    Example:
        >>> with quiet_deepspeed_probe():
        ...     pass
    """
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    notice_filter = _DropCpuNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)
