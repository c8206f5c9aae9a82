"""Log setup: our lines shown, libraries' INFO chatter (matplotlib's font cache) kept off the console."""

from __future__ import annotations

import logging

from grpo_cli.runtime.logs import QUIET_LIBRARIES, setup_logging


def test_library_info_lines_are_dropped_and_their_warnings_kept(caplog):
    setup_logging()
    with caplog.at_level(logging.INFO):  # the root at INFO, as under Hydra
        logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
        logging.getLogger("matplotlib.font_manager").warning("a real problem")
        logging.getLogger("grpo_cli").info("our line")
    messages = [r.getMessage() for r in caplog.records]
    assert "generated new fontManager" not in messages
    assert "a real problem" in messages and "our line" in messages
    assert "matplotlib" in QUIET_LIBRARIES
