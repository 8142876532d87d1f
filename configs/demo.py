"""Demo: a tiny π0-style VLA on three easy Meta-World tasks, 64² images, trains on 2 CPU cores.

Command (the README's demo):
    python -m tools.generate --config configs/demo.py --out runs/demo/data
    python -m vla.train --config configs/demo.py --workdir runs/demo

What it produces: an RLDS/ArrayRecord dataset of scripted-expert episodes, vision-language and
video examples from the same scenes, a SentencePiece tokenizer and normalization statistics under
runs/demo/data; then a trained checkpoint, metrics (JSONL, TensorBoard) and a loss-curve PNG.
"""
import ml_collections

from configs.base import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return base_config()  # the base values are the demo's: tiny model, 64² images, CPU dtypes
