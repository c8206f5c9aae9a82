"""Benchmark-only hook for ``grpo train`` subprocesses of ``scripts/bench_vs_trl.py --lengths``.

``bench_vs_trl.py`` puts this folder on PYTHONPATH and sets ``GRPO_BENCH_LENGTHS`` to a comma-separated
list of completion lengths; every completion the hf engine returns is then cut to its entry (the
j-th completion of a ``generate`` call to ``lengths[j % len(lengths)]`` tokens), the same list TRL's
side applies to its generations. Random-weight models never stop early, so this is how both sides
train on one realistic length mix. Production code never reads the variable.
"""

import os

_LENGTHS = [int(x) for x in os.environ.get("GRPO_BENCH_LENGTHS", "").split(",") if x]

if _LENGTHS:
    from grpo_cli.engines import hf

    _generate = hf.HFEngine.generate

    def _cut(self, requests, decoding, progress=None):
        groups = _generate(self, requests, decoding, progress)
        j = 0
        for group in groups:
            for c in group:
                n = _LENGTHS[j % len(_LENGTHS)]
                c.token_ids = c.token_ids[:n]
                if c.logprobs is not None:
                    c.logprobs = c.logprobs[:n]
                j += 1
        return groups

    hf.HFEngine.generate = _cut
