"""Write a randomly initialized Hugging Face PaliGemma of a config's ViT and VLM shapes.

    python -m tools.make_paligemma --config configs/finetune.py:demo --out runs/finetune/paligemma_hf

transformers builds PaliGemmaForConditionalGeneration at the config's ViT (knobs.vit), VLM
(knobs.vlm), image size and vocabulary and writes it with save_pretrained (config.json +
model.safetensors), exactly the files a hub download of google/paligemma-* holds, only small and
random. It stands in for a pretrained PaliGemma where none can be downloaded (this CPU machine,
CI), so the fine-tune commands of the README run end to end: tools.import_weights --format hf
reads it like a real one. Needs the hf extra (pip install -e ".[hf]").
"""
from __future__ import annotations

from absl import app, flags

from configs import cli, specs
from vla.models.variants import gemma_variant, vit_variant


def write_paligemma(cfg, out: str, seed: int = 0) -> None:
    """A random PaliGemma matching VLAConfig `cfg`'s ViT, VLM expert, image size and vocab -> out/."""
    import torch
    import transformers

    vit, llm = vit_variant(cfg.vit), gemma_variant(cfg.vlm)
    vision = transformers.SiglipVisionConfig(
        hidden_size=vit.width, num_hidden_layers=vit.depth, num_attention_heads=vit.num_heads,
        intermediate_size=vit.mlp_dim, patch_size=vit.patch, image_size=cfg.image_size, vision_use_head=False)
    text = transformers.GemmaConfig(
        hidden_size=llm.width, num_hidden_layers=llm.depth, num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, intermediate_size=llm.mlp_dim,
        vocab_size=cfg.vocab_size, hidden_activation="gelu_pytorch_tanh")
    config = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                          image_token_id=cfg.vocab_size - 1, projection_dim=llm.width)
    torch.manual_seed(seed)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(out)


def main(argv):
    del argv
    f = flags.FLAGS
    spec = specs.build(f.config)
    write_paligemma(spec.model, f.out, spec.train.seed)
    print(f"random PaliGemma ({spec.model.vit}, {spec.model.vlm}, {spec.model.image_size}², vocab "
          f"{spec.model.vocab_size}) -> {f.out}")


if __name__ == "__main__":
    cli.define_config_flag("Run config whose ViT and VLM shapes the PaliGemma gets (required).", lock_config=False)
    flags.DEFINE_string("out", None, "Output directory (save_pretrained) (required).")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main)
