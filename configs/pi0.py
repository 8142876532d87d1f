"""π0 (Black et al. 2024) at its published shapes: So400m/14 at 224², 3 cameras, gemma_2b VLM +
gemma_300m action expert, continuous state token, action horizon 50, action dim 32, 10 flow steps.

Commands:
    python -m tools.tradeoffs --config configs/pi0.py --json   # 3,238,048,528 parameters
    python -m vla.train --config configs/pi0.py --workdir DIR --config.data.root=DATA \
        --config.data.sources.robot.spec=NAME

Data: one robot dataset in RLDS at DATA/robot (data.sources.robot), read through the
data/robots.py dataset spec NAME, which maps its camera keys to base / left_wrist / right_wrist
and names its state and action keys; stats.json beside it (python -m tools.stats), or the
checkpoint's statistics with --config.data.sources.robot.stats=FILE (data/stats.from_openpi).

openpi-compatible, so an imported openpi checkpoint fine-tunes on what it was trained with:
PaliGemma's SentencePiece model at DATA/tokenizer.model (257,152 pieces = model.vocab_size),
openpi's prompts and token ids (data.prompt_format "openpi": nothing is appended to the
vocabulary), and openpi's π0 normalization (mean/std; openpi uses quantiles for π0.5 only).

The knobs section below is the one to sweep: model size, context, control frequency.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from configs.base import base_config

PALIGEMMA_VOCAB = 257_152


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = base_config()
    c.batch_size = 32
    c.total_steps = 30_000
    c.optimizer.lr = 2.5e-5
    c.optimizer.warmup_steps = 1000

    # ---------------------------------------------------------------- knobs
    c.knobs.vit = "So400m/14"
    c.knobs.vlm = "gemma_2b"
    c.knobs.action_expert = "gemma_300m"
    c.knobs.context_frames = 1
    c.knobs.past_frame_tokens = 64
    c.knobs.max_text_tokens = 48
    c.knobs.control_hz = 50.0
    c.knobs.chunk_s = 1.0  # 50 steps at 50 Hz
    c.knobs.steps_executed = 25
    c.knobs.flow_steps = 10

    c.model.mode = "pi0"
    c.model.image_size = 224
    c.model.cameras = ("base", "left_wrist", "right_wrist")
    c.model.state_dim = 32
    c.model.action_dim = 32
    c.model.vocab_size = PALIGEMMA_VOCAB
    c.model.compute_dtype = "bfloat16"

    c.data.prompt_format = "openpi"
    c.data.normalization = "meanstd"
    # format: rlds | lerobot. stats "": the dataset's own stats.json; a path (e.g. an imported
    # checkpoint's) replaces it. eval_split "": data.eval_split (a split name or "N%").
    c.data.sources.robot = dict(kind="robot", format="rlds", path="robot", spec=placeholder(str), weight=1.0,
                                stats="", eval_split="")
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
