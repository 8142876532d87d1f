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
from configs.grid import product, zipped


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = base_config()
    c.batch_size = 32
    c.total_steps = 2000

    # ---------------------------------------------------------------- knobs
    c.knobs.vit = "tiny/8"
    c.knobs.vlm = "gemma_tiny"
    c.knobs.action_expert = "gemma_tiny_expert"
    c.knobs.context_frames = 1
    c.knobs.context_stride_s = 0.25
    c.knobs.past_frame_tokens = 4
    c.knobs.max_text_tokens = 32
    c.knobs.control_hz = 20.0
    c.knobs.chunk_s = 0.5  # 10 steps at 20 Hz
    c.knobs.steps_executed = 5
    c.knobs.flow_steps = 10

    # ---------------------------------------------------------------- model
    c.model.mode = "pi0"
    c.model.image_size = 64
    c.model.cameras = ("corner2",)
    c.model.state_dim = 8  # Meta-World has 4
    c.model.action_dim = 4
    c.model.vocab_size = 2048
    c.model.compute_dtype = "float32"  # bf16 matmuls are no faster than fp32 on CPU

    # ---------------------------------------------------------------- data
    c.data.root = "runs/demo/data"  # tools.generate --out writes here
    # Easy MT10 tasks whose goal is visible at 64² (reach-v3's goal is a 1-pixel dot there):
    # the demo's closed-loop success is measured on these (BENCHMARKS.md).
    c.data.tasks = ("button-press-topdown-v3", "drawer-open-v3", "drawer-close-v3")
    c.data.episodes_per_task = 60
    c.data.heldout_episodes_per_task = 4
    c.data.render_cameras = ("corner2",)
    c.data.sources.metaworld = dict(kind="robot", format="rlds", path="metaworld_rlds", spec="metaworld",
                                    weight=0.8)
    c.data.sources.scenes_vl = dict(kind="vl", path="scenes_vl", weight=0.1)
    c.data.sources.rollout_video = dict(kind="video", path="rollout_video", weight=0.1)

    # ---------------------------------------------------------------- optimizer
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    return c


def sweep() -> list[dict]:
    """The three knobs on this CPU: model size (tiny, or the ~7x larger mu ViT + gemma_small pair)
    x context frames (1, 2) x control rate (20, 40 Hz: action horizons of 10 and 20 steps)."""
    return product(
        zipped({"knobs.vit": ["tiny/8", "mu/8"], "knobs.vlm": ["gemma_tiny", "gemma_small"],
                "knobs.action_expert": ["gemma_tiny_expert", "gemma_small_expert"]}),
        {"knobs.context_frames": [1, 2]},
        {"knobs.control_hz": [20.0, 40.0]},
    )
