"""Fine-tune from imported weights on your own robot data, in openpi's spirit; LoRA optional.

    configs/finetune.py:BASE[,lora][,DATASET]
        BASE  pi0    openpi's π0 base checkpoint (configs/pi0.py shapes: So400m/14, gemma_2b +
                     gemma_300m, 3 cameras at 224², action dim 32, horizon 50, 48 prompt tokens)
              pi05   openpi's π0.5 base checkpoint (configs/pi05.py shapes, 200 prompt tokens),
                     trained with the flow loss only, as openpi fine-tunes it
              demo   the demo's tiny model on the demo's Meta-World data, for a CPU: PaliGemma
                     weights (a random one from tools.make_paligemma where none can be
                     downloaded) start its ViT and VLM
        lora   low-rank adapters on both experts' projections (rank 16, alpha 16, as openpi's
               gemma_2b_lora); the experts' base weights frozen and kept out of the optimizer
               state, the ViT and the action / state / time projections trained, as openpi does
        DATASET  (pi0 / pi05) the robot data, at DATA/DATASET, read through the data/robots.py
               spec of that name: bridge, fractal or droid (Open X-Embodiment RLDS, converted
               once with tools.convert rlds), libero (openpi's LeRobot LIBERO dataset); the
               action chunk is taken at the dataset's own rate (horizon 50: chunk_s = 50 / hz),
               and datasets with only a train split are evaluated on a 5% hash hold-out. Without
               it the source is DATA/robot with --config.data.sources.robot.spec=NAME (and
               .format=lerobot for a LeRobot directory). The README's "Your own data" has the
               commands from the raw download to a served bundle.

The weights are config.init = (dict(format="vla", path="runs/finetune/BASE/weights"),): the
output of tools.import_weights, which also converts an openpi checkpoint's norm stats (point
the robot source at them with --config.data.sources.robot.stats=.../assets/ID/stats.json).
pi0 / pi05 use openpi's prompts and the PaliGemma tokenizer (DATA/tokenizer.model). The
README's "Fine-tune π0 / π0.5" gives every command, from tools.import_weights to vla.serve:

    python -m tools.make_paligemma --config configs/finetune.py:demo --out runs/finetune/paligemma_hf
    python -m tools.import_weights --format hf --src runs/finetune/paligemma_hf \
        --config configs/finetune.py:demo --out runs/finetune/demo/weights
    python -m vla.train --config configs/finetune.py:demo,lora --workdir runs/finetune/demo/run

The demo fine-tune runs 300 steps (about 2 minutes on a 2-core CPU) after the demo has
generated its data (python -m tools.demo, or tools.generate); its loss curve is
runs/finetune/demo/run/loss.png. Optimizer settings follow openpi's fine-tuning recipe: peak lr
2.5e-5 after 1,000 warmup steps, cosine decay, b2 0.95, clip 1, EMA 0.99 (none with LoRA).
"""
import ml_collections

from configs import demo, pi0, pi05
from data.robots import get_spec

BASES = ("pi0", "pi05", "demo")
# DATASET -> (format, the splits it is published with: its eval split, or a hold-out).
DATASETS = {"bridge": ("rlds", "test"), "fractal": ("rlds", "5%"), "droid": ("rlds", "5%"),
            "libero": ("lerobot", "5%")}
HORIZON = 50
# LeRobot datasets state their rate in info.json; the config needs it before any data is opened.
LEROBOT_FPS = {"libero": 10.0}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base, *options = (arg or "pi05").split(",")
    datasets = [o for o in options if o in DATASETS]
    options = [o for o in options if o not in DATASETS]
    if base not in BASES or set(options) - {"lora"} or len(datasets) > 1 or (datasets and base == "demo"):
        raise ValueError(f"configs/finetune.py takes BASE[,lora][,DATASET] with BASE in {BASES} and DATASET "
                         f"(pi0 / pi05) in {sorted(DATASETS)}, got {arg!r}")
    if base == "demo":
        c = demo.get_config()
        c.total_steps = 300
        c.optimizer.lr = 1e-3 if options else 3e-4  # adapters start at zero and need a larger step
        c.optimizer.warmup_steps = 30
        c.checkpoint_every = c.eval_every = 100
    else:
        c = pi0.get_config() if base == "pi0" else pi05.get_config("posttrain")
        if base == "pi05":  # openpi fine-tunes π0.5 on actions only: no FAST targets, no text loss
            c.data.fast_targets = False
            c.model.text_loss_weight = 0.0
            c.model.knowledge_insulation = False
        c.optimizer.lr = 2.5e-5
        c.optimizer.warmup_steps = 1000
        c.optimizer.b2 = 0.95
        c.optimizer.weight_decay = 1e-10
        c.optimizer.ema_decay = 0.99
    if datasets:
        name = datasets[0]
        fmt, eval_split = DATASETS[name]
        c.data.sources.robot.update(format=fmt, path=name, spec=name, eval_split=eval_split)
        hz = get_spec(name).control_hz or LEROBOT_FPS[name]
        c.knobs.control_hz = hz
        c.knobs.chunk_s = HORIZON / hz
        c.knobs.steps_executed = min(c.knobs.steps_executed, HORIZON // 2)
    c.init = (dict(format="vla", path=f"runs/finetune/{base}/weights"),)
    if options:
        c.model.lora_rank = 16
        c.model.lora_alpha = 16.0
        c.model.lora_targets = ("decoder/experts/0/", "decoder/experts/1/")
        # As openpi: the ViT and the action, state and time projections train in full.
        c.optimizer.also_train = ("^vit/", "^action_", "^time_mlp_" if base == "pi05" else "^state_proj/")
        c.optimizer.ema_decay = 0.0
    return c
