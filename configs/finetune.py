"""Fine-tune from imported weights on your own robot data, in openpi's spirit; LoRA optional.

    configs/finetune.py:BASE[,lora]
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

BASES = ("pi0", "pi05", "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base, *options = (arg or "pi05").split(",")
    if base not in BASES or set(options) - {"lora"}:
        raise ValueError(f"configs/finetune.py takes BASE[,lora] with BASE in {BASES}, got {arg!r}")
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
    c.init = (dict(format="vla", path=f"runs/finetune/{base}/weights"),)
    if options:
        c.model.lora_rank = 16
        c.model.lora_alpha = 16.0
        c.model.lora_targets = ("decoder/experts/0/", "decoder/experts/1/")
        # As openpi: the ViT and the action, state and time projections train in full.
        c.optimizer.also_train = ("^vit/", "^action_", "^time_mlp_" if base == "pi05" else "^state_proj/")
        c.optimizer.ema_decay = 0.0
    return c
