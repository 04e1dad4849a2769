"""``quiet()``: hide third-party warnings and log lines that tell a PPO user nothing.

Importing lit_vhead changes no warning filter and no logger. ``python train.py`` runs under :func:`quiet`; Python
users opt in, for the rest of the process or for a block::

    lit_vhead.quiet()            # from now on (e.g. at the top of a notebook)
    with lit_vhead.quiet():      # only inside the block; the filters are removed again on exit
        trainer.fit(module)

What it hides: Lightning's and peft's own uses of deprecated torch/transformers APIs (``FutureWarning``s about
``LeafSpec`` and ``is_gradient_checkpointing``), Lightning's warning that ``max_epochs`` is unset (``PPOModule``
sets it to ``ppo.steps``), Lightning's advertisements for its cloud services ("💡 Tip: ...") and its
"GPU available: False, used: False" inventory lines.
"""

from __future__ import annotations

import logging
import warnings
from types import TracebackType

# (message regex, category, module regex) as warnings.filterwarnings takes them
WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, ""),
    ("`max_epochs` was not set", Warning, "lightning"),
)
TIPS_LOGGER = "lightning.pytorch.utilities.rank_zero"


LIGHTNING_LINES = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:")


class _DropLightningTips(logging.Filter):
    """Lightning's advertisements for its cloud services ("💡 Tip: ...") and its accelerator inventory lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_LINES) and "💡 Tip" not in str(record.msg)


class quiet:  # noqa: N801 (used like a function: ``lit_vhead.quiet()``)
    """Hide the warnings and log lines listed in :mod:`lit_vhead.noise` from now on; used as a context manager, only
    until the block ends (the warning filters are then restored as they were on entry, as
    ``warnings.catch_warnings`` restores them, and the log filter is removed)."""

    def __init__(self) -> None:
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()  # a copy of the filters to restore on exit; never exited when used as a call
        for message, category, module in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        self._tips = _DropLightningTips()
        logging.getLogger(TIPS_LOGGER).addFilter(self._tips)

    def __enter__(self) -> quiet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        logging.getLogger(TIPS_LOGGER).removeFilter(self._tips)
        self._saved.__exit__(exc_type, exc, tb)
