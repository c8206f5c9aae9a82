"""Build the embedded tiny model (a Qwen2 warmed up on noisy arithmetic) into a directory.

    python scripts/build_tiny_model.py                 # into the cache, as `grpo train` does on first use
    python scripts/build_tiny_model.py --out /tmp/tiny --steps 200   # a quick, smaller warm-up elsewhere

About a minute on 2 CPU cores with the defaults; deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from grpo_cli.models.tiny import TinySpec, build, ensure_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write (default: the $GRPO_HOME cache)")
    parser.add_argument("--seed", type=int, default=TinySpec.seed)
    parser.add_argument("--steps", type=int, default=TinySpec.steps)
    args = parser.parse_args()
    spec = replace(TinySpec(), seed=args.seed, steps=args.steps)
    if args.out is None:
        print(ensure_tiny(spec))
    else:
        build(spec, args.out)
        print(args.out)


if __name__ == "__main__":
    main()
