r"""Demo: a tiny π0-style VLA on three easy Meta-World tasks, 64² images, trains on 2 CPU cores.

Command (the README's demo):
    python -m tools.generate --config configs/demo.py --out runs/demo/data
    python -m vla.train --config configs/demo.py --workdir runs/demo

What it produces: an RLDS/ArrayRecord dataset of scripted-expert episodes, vision-language and
video examples from the same scenes, a SentencePiece tokenizer and normalization statistics under
runs/demo/data; then a trained checkpoint, metrics (JSONL, TensorBoard) and a loss-curve PNG.

The trade-off sweep (`sweep()`, 8 runs) and its table and plot:
    python -m launch.sweep --config configs/demo.py --root runs/sweep \
        --config.data.root=runs/demo/data --config.total_steps=1000
    python -m launch.summary --root runs/sweep
"""
import ml_collections

from configs.base import base_config
from launch.grid import product, zipped


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return base_config()  # the base values are the demo's: tiny model, 64² images, CPU dtypes


def sweep() -> list[dict]:
    """The three knobs on this CPU: model size (tiny, or the ~7x larger mu ViT + gemma_small pair)
    x context frames (1, 2) x control rate (20, 40 Hz: action horizons of 10 and 20 steps)."""
    return product(
        zipped({"knobs.vit": ["tiny/8", "mu/8"], "knobs.vlm": ["gemma_tiny", "gemma_small"],
                "knobs.action_expert": ["gemma_tiny_expert", "gemma_small_expert"]}),
        {"knobs.context_frames": [1, 2]},
        {"knobs.control_hz": [20.0, 40.0]},
    )
