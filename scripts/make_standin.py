"""Build a stand-in for a real hub model offline: its exact config, random weights, a locally trained
byte-level BPE with the family's special tokens at their real ids, and a ChatML chat template.

    python scripts/make_standin.py --out /tmp/qwen-standin          # Qwen2.5-0.5B-Instruct, 24 layers
    grpo train model=qwen model.name_or_path=/tmp/qwen-standin data=gsm8k data.path=/path/to/gsm8k

Time: `--layers 2` took 35-55 s on a shared, heavily loaded 2-core machine (~13 s of it learning the
merges on GSM8K); the 24-layer default writes ~1 GB of bfloat16 weights and peaks at ~3 GB of RAM
(the float32 init plus its bf16 copy), a few minutes on 2 cores. Deterministic for a given --seed.
Random weights: the stand-in proves the path, memory and speed, never learning. See
grpo_cli/models/standin.py for the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpo_cli.models.standin import ARCHS, DEFAULT_ARCH, build_standin

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="model directory to write (replaced if it exists)"
    )
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS), help="whose config to copy")
    parser.add_argument("--layers", type=int, help="override the layer count (tests: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="saved weights")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="holds gsm8k/train.jsonl, the tokenizer's training text (missing: generated text)",
    )
    parser.add_argument("--bpe-vocab", type=int, default=32000, help="merges learned (the rest is filler)")
    args = parser.parse_args()
    out = build_standin(
        args.out,
        arch=args.arch,
        layers=args.layers,
        seed=args.seed,
        dtype=args.dtype,
        data_dir=args.data_dir,
        bpe_vocab=args.bpe_vocab,
    )
    print(out)


if __name__ == "__main__":
    main()
