"""The ``grpo`` command: the first word picks the subcommand, every other word goes to Hydra untouched.

    grpo train model=qwen reward=math algo.beta=0.0
    grpo sample algo.group_size=16
    grpo eval checkpoint=outputs/2026-01-01/12-00-00/checkpoint-200
    grpo export checkpoint=outputs/2026-01-01/12-00-00/checkpoint-200 out=exported/model
    grpo train --cfg job          # Hydra's own flags keep working: --help, -m, hydra.run.dir=...

Before Hydra starts a run, the overrides are composed once here so that a bad value, an unknown
group option or a missing model path is one error line (exit code 2) instead of a traceback.
Project modules are imported inside the functions here, so that ``grpo --help`` starts fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("grpo_cli.commands.train", "train the policy with GRPO"),
    "sample": ("grpo_cli.commands.sample", "show G completions per prompt with rewards and advantages"),
    "eval": ("grpo_cli.commands.eval", "pass@k, maj@k and mean reward of checkpoints"),
    "export": ("grpo_cli.commands.export", "a checkpoint as a plain transformers model dir (LoRA merged)"),
}
# Not a Hydra command: vLLM's own server with its flags (``grpo serve --help``).
SERVE = ("grpo_cli.commands.serve", "a generation server for rollout.engine=vllm-server (vLLM's own)")
# Flags after which Hydra does not run a single job, so there is nothing to pre-validate.
_NO_PRECHECK = {
    "-m",
    "--multirun",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
}

USAGE = (
    "usage: grpo {train,sample,eval,export} [key=value ...] [hydra flags]\n"
    "       grpo serve [--model M] [--port P] [-- vllm flags]\n"
    "       torchrun --nproc_per_node N -m grpo_cli train [key=value ...]   (data-parallel)\n\n"
    + "\n".join(f"  {name:<8}{desc}" for name, (_, desc) in {**SUBCOMMANDS, "serve": SERVE}.items())
    + "\n\ngrpo <command> --help lists its config groups; grpo <command> --cfg job prints its config."
)


def compose_config(command: str, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """Compose ``conf/<command>.yaml`` with overrides. Returns (typed dataclass object, DictConfig)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grpo_cli.config import conf_dir, register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        dcfg = compose(config_name=command, overrides=list(overrides))
    return OmegaConf.to_object(dcfg), dcfg


def describe_error(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, what was wrong, what is allowed."""
    import re

    from grpo_cli.config import conf_dir, renamed

    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for err in chain:
        key = getattr(err, "full_key", None)
        if line := renamed(key):  # an old key in a YAML file of the user's
            return line
        if key:
            first = str(err).splitlines()[0]
            return f"{key}: {first}"
    text = str(chain[0])
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    return " ".join(text.split())[:300]


def precheck(command: str, args: Sequence[str]) -> str | None:
    """Compose and validate the overrides; return an error line, or None when they are good."""
    from grpo_cli.commands.validate import validate
    from grpo_cli.config import ConfigError

    if any(a.split("=")[0] in _NO_PRECHECK for a in args):
        return None
    overrides = [a for a in args if not a.startswith("-") and not a.startswith("hydra.")]
    try:
        cfg, _ = compose_config(command, overrides)
        validate(cfg)
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - every composition failure becomes one line
        return describe_error(exc)
    return None


def distributed_args(args: list[str]) -> list[str]:
    """Under torchrun: one run directory for every rank, and Hydra's own files from rank 0 only.

    Hydra names the default run directory by the clock, which ranks read at different instants, so
    rank 0's reading is sent to all (the pattern is conf/train.yaml's ``hydra.run.dir``).
    """
    import time

    from grpo_cli.runtime import distributed

    world = distributed.init()
    if not world.enabled:
        return args
    if not any(a.startswith("hydra.run.dir=") for a in args):
        stamp = distributed.broadcast_object(time.strftime("%Y-%m-%d/%H-%M-%S"))
        args = [*args, f"hydra.run.dir=outputs/{stamp}"]
    if not world.is_main:
        args = [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return args


def _hydra_entry(command: str, run: Callable[[Any, str], Any]) -> Callable[[], None]:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from grpo_cli.commands.validate import validate
    from grpo_cli.config import ConfigError, conf_dir
    from grpo_cli.engines.server import ServersTaken
    from grpo_cli.engines.server.http import SERVER_FAILED_EXIT, ServerError

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=command)
    def _main(dcfg) -> None:
        try:
            cfg = OmegaConf.to_object(dcfg)
            validate(cfg)
            run(cfg, HydraConfig.get().runtime.output_dir)
        except ConfigError as exc:
            print(f"grpo {command}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except ServersTaken as exc:  # another live run owns the servers: the line says what to do
            print(f"grpo {command}: error: {exc}", file=sys.stderr)
            sys.exit(SERVER_FAILED_EXIT)
        except ServerError as exc:  # a generation server failed before the run started (or in eval)
            print(
                f"grpo {command}: error: generation server failed: {exc}; start it again and rerun the command",
                file=sys.stderr,
            )
            sys.exit(SERVER_FAILED_EXIT)

    return _main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return importlib.import_module(SERVE[0]).main(rest)
    if command not in SUBCOMMANDS:
        print(f"grpo: unknown subcommand {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    from grpo_cli.config import override_key, register, renamed

    register()
    # An old key's successor named at once, sweeps included (precheck does not compose those).
    error = next((line for a in rest if (line := renamed(override_key(a)))), None) or precheck(command, rest)
    if error:
        print(f"grpo {command}: error: {error}", file=sys.stderr)
        return 2
    if command == "train":
        rest = distributed_args(rest)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    sys.argv = [f"grpo {command}", *rest]
    _hydra_entry(command, module.run)()
    # Only after a clean finish (every rank passed the run's last barrier): after an error the peers
    # may be gone, and leaving the group would wait for them.
    from grpo_cli.runtime import distributed

    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
