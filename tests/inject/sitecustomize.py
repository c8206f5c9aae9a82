"""Test-only failure injection for ``grpo`` subprocesses (torchrun ranks included).

A test puts this folder on PYTHONPATH, so Python imports this module at start-up, and sets:
- ``GRPO_TEST_SAVE_DELAY=<seconds>``: sleep between writing a checkpoint's files and renaming its
  directory into place (``checkpoint.publish``), so a test can kill the process mid-save;
- ``GRPO_TEST_FAIL_RANK=<rank>:<step>``: that rank raises during that step (a failing rank must end
  the job).
Production code reads neither variable; without them this module does nothing.
"""

import os

_DELAY = float(os.environ.get("GRPO_TEST_SAVE_DELAY", "0") or 0)
_FAIL = os.environ.get("GRPO_TEST_FAIL_RANK", "")

if _DELAY:
    import time

    from grpo_cli.run import checkpoint

    _publish = checkpoint.publish

    def _slow_publish(tmp, final):
        time.sleep(_DELAY)
        _publish(tmp, final)

    checkpoint.publish = _slow_publish

if _FAIL:
    from grpo_cli.commands import train
    from grpo_cli.runtime import distributed

    _train_step = train.train_step  # commands.train calls it by this name
    _rank, _step = map(int, _FAIL.split(":"))

    _calls = [0]  # a fresh run's steps are numbered from 1

    def _failing_step(*args, **kwargs):
        _calls[0] += 1
        if (distributed.world().rank, _calls[0]) == (_rank, _step):
            raise RuntimeError(f"GRPO_TEST_FAIL_RANK: rank {_rank} fails at step {_calls[0]}")
        return _train_step(*args, **kwargs)

    train.train_step = _failing_step
