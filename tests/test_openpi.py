"""openpi checkpoints: every fixture under ../shared/fixtures/openpi (real π0 / π0.5 checkpoints
saved by openpi's own code, with openpi's own outputs in reference.npz) imported through
config.init reproduces openpi's sample_actions and compute_loss to 1e-4 in fp32.

The model is built from each folder's config.json alone, so a fixture of other shapes needs no
code here. The import goes into a model sharded over the 8 test devices (fsdp x tensor)."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vla import sharding
from vla.models.vla import VLA, VLAConfig, flow_noise
from vla.weights.load import InitSource, WeightImportError, check_prompt_format, init_params

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openpi"
FOLDERS = sorted(p for p in FIXTURES.glob("*") if (p / "config.json").exists()) if FIXTURES.is_dir() else []
TOLERANCE = 1e-4
GEMMA_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")


def model_config(folder: pathlib.Path) -> VLAConfig:
    """Our model of a fixture's openpi Pi0Config and SigLIP shapes (config.json), in fp32."""
    c = json.loads((folder / "config.json").read_text())
    pi0, vit = c["pi0_config"], c["siglip"]
    gemma = lambda g: ",".join(f"{k}={g[k]}" for k in GEMMA_FIELDS)
    height, width = vit["image_resolution"]
    assert height == width and vit["patch_size"][0] == vit["patch_size"][1]
    return VLAConfig(
        mode="pi05" if pi0["pi05"] else "pi0",
        vit=f"width={vit['width']},depth={vit['depth']},mlp_dim={vit['mlp_dim']},"
            f"num_heads={vit['num_heads']},patch={vit['patch_size'][0]}",
        vlm=gemma(c["paligemma_gemma_config"]), action_expert=gemma(c["action_expert_gemma_config"]),
        image_size=height, cameras=tuple(c["image_keys_in_prefix_order"]),
        max_text_tokens=pi0["max_token_len"], state_dim=pi0["action_dim"],  # openpi pads state to action_dim
        action_dim=pi0["action_dim"], action_horizon=pi0["action_horizon"], vocab_size=c["vocab_size"],
        param_dtype="float32", compute_dtype="float32", remat_policy="none")


def reference_batch(cfg: VLAConfig, ref) -> dict:
    """openpi's Observation of reference.npz in the batch contract (images already in [-1, 1])."""
    return dict(
        images={cam: jnp.asarray(ref[f"image_{cam}"])[:, None] for cam in cfg.cameras},
        image_mask=jnp.stack([jnp.asarray(ref[f"image_mask_{cam}"]) for cam in cfg.cameras], axis=1),
        tokens=jnp.asarray(ref["tokenized_prompt"]), token_mask=jnp.asarray(ref["tokenized_prompt_mask"]),
        target_mask=jnp.zeros(ref["tokenized_prompt_mask"].shape, bool), state=jnp.asarray(ref["state"]),
        actions=jnp.asarray(ref["actions"]), action_mask=jnp.ones(ref["actions"].shape, bool),
        source=jnp.arange(ref["actions"].shape[0], dtype=jnp.int32))  # one source per example


def import_openpi(folder: pathlib.Path, cfg: VLAConfig, mesh, **source) -> tuple[VLA, list[dict]]:
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = sharding.init_sharded(lambda: VLA(cfg, rngs=nnx.Rngs(0)), mesh, rules)
        graphdef, state = nnx.split(model)
        params, reports = init_params([InitSource("openpi", str(folder / "params"), **source)], cfg,
                                      nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state), reports


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


@pytest.mark.skipif(not FOLDERS, reason=f"no openpi fixtures under {FIXTURES}")
@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_imported_openpi_checkpoint_reproduces_openpi(folder, mesh):
    cfg = model_config(folder)
    ref = np.load(folder / "reference.npz")
    model, (report,) = import_openpi(folder, cfg, mesh)
    assert report["kept"] == [] and report["ignored"] == []  # every tensor of the file, every parameter
    batch = reference_batch(cfg, ref)
    key = jax.random.wrap_key_data(jnp.asarray(ref["loss_rng_key"]))
    b = ref["actions"].shape[0]

    @nnx.jit
    def run(model, batch, noise, key):
        actions = model.sample_actions(batch, noise=noise, num_steps=10)
        _, metrics = model.loss(batch, key, num_sources=b)
        return actions, metrics

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        actions, metrics = run(model, batch, jnp.asarray(ref["noise"]), key)
    np.testing.assert_allclose(np.asarray(actions), ref["sample_actions_f32"], atol=TOLERANCE, rtol=0)
    # The noise and time openpi drew inside compute_loss, from the same key.
    eps, t = flow_noise(key, ref["actions"].shape)
    np.testing.assert_array_equal(np.asarray(eps), ref["loss_noise"])
    np.testing.assert_allclose(np.asarray(t), ref["loss_time"], rtol=1e-6)
    # openpi's loss is [B, H] (mean over action dims); ours per example is its mean over H.
    np.testing.assert_allclose(np.asarray(metrics["flow_loss_per_source"]), ref["loss_f32"].mean(axis=1),
                               atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(float(metrics["flow_loss"]), ref["loss_f32"].mean(), atol=TOLERANCE, rtol=0)


@pytest.mark.skipif(not FOLDERS, reason=f"no openpi fixtures under {FIXTURES}")
def test_openpi_checkpoint_of_another_shape_fails_before_assigning(mesh):
    """A model of another action dim: one error naming each parameter with both shapes."""
    folder = FOLDERS[0]
    cfg = model_config(folder)
    wrong = dataclasses.replace(cfg, action_dim=cfg.action_dim + 1)
    with pytest.raises(WeightImportError) as e:
        import_openpi(folder, wrong, mesh)
    message = str(e.value)
    a = cfg.action_dim
    assert "nothing was assigned" in message
    assert f"action_in_proj/kernel: action_in_proj/kernel has shape ({a}, " in message
    assert f"the model needs ({a + 1}, " in message
    assert "action_out_proj/bias: action_out_proj/bias has shape" in message


@pytest.mark.skipif(not FOLDERS, reason=f"no openpi fixtures under {FIXTURES}")
def test_openpi_weights_need_openpis_prompts():
    source = InitSource("openpi", str(FOLDERS[0] / "params"))
    check_prompt_format([source], "openpi")
    with pytest.raises(ValueError, match="set config.data.prompt_format='openpi' \\(it is 'vla'\\)"):
        check_prompt_format([source], "vla")


@pytest.mark.skipif(not FOLDERS, reason=f"no openpi fixtures under {FIXTURES}")
def test_import_weights_writes_params_and_the_checkpoints_norm_stats(tmp_path):
    """tools.import_weights --format openpi: OUT/params is a weight source giving the openpi
    parameters, and assets/<id>/norm_stats.json (openpi's normalize.save) becomes our stats.json."""
    from configs import finetune, specs
    from data import stats as stats_lib
    from tools.import_weights import import_to_directory

    folder = FOLDERS[0]
    spec = specs.build(finetune.get_config("pi05"))
    spec = dataclasses.replace(spec, model=model_config(folder))
    report = import_to_directory(spec, InitSource("openpi", str(folder / "params")), str(tmp_path / "out"))
    (asset,) = sorted(p.name for p in (folder / "assets").iterdir())
    written = tmp_path / "out" / "assets" / asset / stats_lib.STATS_FILE
    assert report["assets"] == {asset: str(written)}
    assert stats_lib.read(written) == stats_lib.from_openpi(folder / "assets" / asset / "norm_stats.json")
    assert json.loads((tmp_path / "out" / "import.json").read_text())["format"] == "openpi"
    assert not report["kept"]
