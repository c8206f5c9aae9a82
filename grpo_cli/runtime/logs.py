"""Log setup for every command: our lines on stderr, library chatter kept quiet."""

from __future__ import annotations

import logging

log = logging.getLogger("grpo_cli")
QUIET_LIBRARIES = ("matplotlib", "PIL", "urllib3", "filelock", "httpx")


def setup_logging(level: int = logging.INFO) -> None:
    """Our log lines on stderr; transformers' per-load progress bars and chatter kept quiet."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Libraries that log at INFO under Hydra's root logger: matplotlib's first use of a font cache
    # ("generated new fontManager") is nothing for a user to act on.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # peft still calls this deprecated transformers property; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Under Hydra the root logger already prints to the console (and to <run_dir>/<job>.log): a handler
    # of our own would show every line twice.
    if not log.handlers and not console_handlers(logging.getLogger()):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def console_handlers(logger: logging.Logger) -> list[logging.StreamHandler]:
    # Exact type: FileHandler and pytest's capture handlers subclass StreamHandler.
    return [h for h in logger.handlers if type(h) is logging.StreamHandler]
