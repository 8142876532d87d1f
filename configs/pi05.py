"""π0.5 (Physical Intelligence 2025) at its published shapes, trained in two stages.

    stage "pretrain": discrete FAST action tokens + co-training data (vision-language, video),
                      the action expert off (flow weight 0); the VLM learns actions as text.
    stage "posttrain": flow matching with the action expert and knowledge insulation (the flow
                      loss does not move the VLM), FAST tokens still trained as targets.

Commands:
    python -m tools.tradeoffs --config configs/pi05.py --json   # 3,353,433,872 parameters
    python -m vla.train --config configs/pi05.py:pretrain --workdir DIR1
    python -m vla.train --config configs/pi05.py:posttrain --workdir DIR2 \
        --config.init='({"format": "vla", "path": "DIR1"},)'

Differences to π0: state is discretized into the prompt, flow time conditions the action expert
through adaRMSNorm, there is no state token, and a subtask can be decoded before actions.
Prompts are openpi's ("Task: ..., State: 12 200 ...;\\nAction: ", data/prompt.py), FAST ids sit on
PaliGemma's last pieces as in π0-FAST (its <loc> tokens), so the PaliGemma tokenizer's 257,152
ids are the model's vocab_size; normalization is quantile, as openpi's π0.5.
"""
import ml_collections

from configs import pi0

STAGES = ("pretrain", "posttrain")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    stage = arg or "posttrain"
    if stage not in STAGES:
        raise ValueError(f"configs/pi05.py takes a stage in {STAGES}, got {stage!r}")
    c = pi0.get_config()
    c.model.mode = "pi05"
    c.knobs.max_text_tokens = 200  # task + state text (<= 4 a dim) + subtask + FAST (openpi: 200)
    c.data.normalization = "quantile"  # openpi's for π0.5 (π0's is mean/std)
    c.data.fast_targets = True  # robot examples carry "Subtask: ...\nAction: <FAST>|" targets
    if stage == "pretrain":
        c.model.flow_loss_weight = 0.0
        c.model.text_loss_weight = 1.0
    else:
        c.model.knowledge_insulation = True
        c.model.flow_loss_weight = 1.0
        c.model.text_loss_weight = 1.0
    return c
