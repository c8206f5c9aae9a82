"""``grpo sample``: G completions for a few prompts, with rewards and group-relative advantages.

    grpo sample                                  # 2 arithmetic prompts x 8 completions, tiny model
    grpo sample sample.prompts=4 algo.group_size=16 reward=math_format

With ``env=`` an episode's turns are shown whole, the tool's answers in cyan.
The table per prompt is GRPO's first two steps made visible: the group's rewards, their mean and
std, and A_i as ``core.advantages`` computes it for training (``algo.advantage``).
Also written to ``<run_dir>/samples.jsonl``, one completion per line (``records``), with its
``token_ids`` and ``model_mask`` for checking what the model sampled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from grpo_cli.commands.build import build_run
from grpo_cli.commands.update import advantages_for
from grpo_cli.config import SampleRoot
from grpo_cli.data import build_prompt, reference
from grpo_cli.rollout.generate import score
from grpo_cli.rollout.record import Rollout, token_record, token_runs, transcript
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.runtime.logs import setup_logging


def _table(ro: Rollout, advantages: torch.Tensor, g: int, prompt: str, tok: Any) -> Table:
    G = ro.group_size
    rows = slice(g * G, (g + 1) * G)
    judged = ro.rewards[rows][ro.judged[rows]]
    mean = float(judged.mean()) if len(judged) else float("nan")
    std = float(judged.std()) if len(judged) > 1 else 0.0
    gold = ro.rows[g * G].get("answer", "")
    table = Table(title=f"{prompt!r}  (gold {gold})", caption=f"group mean {mean:.3f}  std {std:.3f}")
    table.add_column("i", justify="right")
    table.add_column("completion")
    table.add_column("reward", justify="right")
    table.add_column("advantage", justify="right")
    table.add_column("tokens", justify="right")
    for i in range(rows.start, rows.stop):
        adv = float(advantages[i])
        color = "green" if adv > 0 else "red" if adv < 0 else "white"
        table.add_row(
            str(i - rows.start),
            _shown(ro, i, tok),
            f"{float(ro.rewards[i]):.3f}",
            f"[{color}]{adv:+.3f}[/{color}]",
            str(int(ro.lengths[i])),
        )
    return table


def _shown(ro: Rollout, i: int, tok: Any) -> str | Text:
    """Completion i as shown: its text, or for an episode its turns with the tool's answers in cyan."""
    if ro.model_mask is None:
        return ro.texts[i].strip()[:200]
    n = int(ro.completion_mask[i].sum())
    shown = Text()
    for is_model, run in token_runs(ro.completion_ids[i, :n].tolist(), ro.model_mask[i, :n].tolist()):
        shown.append(tok.decode(run), style=None if is_model else "cyan")
    shown.truncate(400)
    return shown


def records(ro: Rollout, advantages: torch.Tensor, prompts: list[str], tok: Any) -> list[dict[str, Any]]:
    """The samples.jsonl rows: ``completion`` is the model's own words (what the rules judged),
    ``reference`` what they judged it against (``data.reference``);
    ``token_ids`` the ids after the prompt and ``model_mask`` 1 where the model sampled the id;
    episodes with a tool add ``transcript`` (every token decoded) and their counters."""
    return [
        {
            "prompt_index": i // ro.group_size,
            "id": ro.rows[i].get("id"),
            "prompt": prompts[i // ro.group_size],
            "completion": ro.texts[i],
            "reference": reference(ro.rows[i]),
            **({"transcript": transcript(ro, i, tok)} if ro.model_mask is not None else {}),
            "reward": float(ro.rewards[i]) if ro.judged[i] else None,
            "advantage": float(advantages[i]),
            "tokens": int(ro.lengths[i]),
            **{f"reward/{k}": v[i] for k, v in ro.per_rule.items()},
            **{k: v[i] for k, v in ro.episode_stats.items()},
            **token_record(ro, i),
        }
        for i in range(len(ro.texts))
    ]


def run(cfg: SampleRoot, run_dir: str) -> list[dict[str, Any]]:
    """Sample, score, and show ``sample.prompts`` groups; returns the records written to samples.jsonl."""
    setup_logging()
    G = cfg.algo.group_size
    with build_run(cfg) as r:
        progress = GenerationProgress(Console(stderr=True), live=cfg.console == "rich")
        with progress.task("sampling", len(r.rows) * G) as advance:
            ro = r.sampler.generate(r.rows, G, progress=advance)
        ro = score(ro, r.rewarder)
    advantages, _ = advantages_for(ro, G, cfg.algo.scale_rewards, cfg.algo.advantage, cfg.algo.passk_k)
    prompts = [build_prompt(row, cfg.data.template) for row in r.rows]
    console = Console()
    for g, prompt in enumerate(prompts):
        console.print(_table(ro, advantages, g, prompt, r.policy.tokenizer))
    out = Path(cfg.sample.out) if cfg.sample.out else Path(run_dir) / "samples.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    written = records(ro, advantages, prompts, r.policy.tokenizer)
    out.write_text("".join(json.dumps(rec) + "\n" for rec in written))
    console.print(f"wrote {out}")
    return written
