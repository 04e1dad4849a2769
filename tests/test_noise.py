"""``lit_vhead.quiet()``: third-party noise hidden on request, for a block or from the call on, and nothing else."""

import logging
import warnings

import lit_vhead
from lit_vhead.noise import TIPS_LOGGER


def test_quiet_as_a_block_hides_the_noise_inside_and_restores_everything_after(caplog):
    filters, log_filters = list(warnings.filters), list(logging.getLogger(TIPS_LOGGER).filters)
    with lit_vhead.quiet():
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("a warning of yours", UserWarning, stacklevel=1)
        logging.getLogger(TIPS_LOGGER).warning("💡 Tip: try our cloud")
        logging.getLogger(TIPS_LOGGER).warning("GPU available: False, used: False")
        logging.getLogger(TIPS_LOGGER).warning("Restoring states from the checkpoint path at last.ckpt")
    assert [str(w.message) for w in caught] == ["a warning of yours"]
    assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint path at last.ckpt"]
    assert warnings.filters == filters and logging.getLogger(TIPS_LOGGER).filters == log_filters


def test_quiet_as_a_call_stays_in_force(caplog):
    log_filters = list(logging.getLogger(TIPS_LOGGER).filters)
    with warnings.catch_warnings():  # this test's own scope, as pytest gives each test
        lit_vhead.quiet()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger(TIPS_LOGGER).warning("💡 Tip: try our cloud")
        assert caught == [] and caplog.records == []
    logging.getLogger(TIPS_LOGGER).filters[:] = log_filters
