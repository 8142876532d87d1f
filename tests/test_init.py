"""config.init in the trainer: a new run starts from weight sources of every format, and its
first step's loss is the loss of the imported model (a forward pass outside the trainer, on an
unsharded copy) on the same batch with the same key."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import specs
from data import pipeline as pipeline_lib
from tests.test_import_weights import _hf_model, save_npz, to_big_vision
from tests.test_train import small_config
from tools.import_weights import import_to_directory
from vla import train as train_lib
from vla.models.vla import VLA
from vla.weights import rules
from vla.weights.load import InitSource, init_params

pytest.importorskip("transformers")


def write_openpi_layout(model: VLA, directory: str) -> str:
    """`model`'s parameters as an openpi checkpoint's params/ directory: {"params": tree} in
    openpi's names (the layout tests/test_openpi.py checks against real openpi checkpoints), bf16."""
    params = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tree: dict = {}
    for rule in rules.rules("openpi", model.cfg, {k: v.shape for k, v in params.items()}):
        value = params[rule.target].reshape(rule.shape).astype(jnp.bfloat16)  # pos_embedding gains openpi's [1, ...]
        *parents, leaf = rule.sources[0].split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = os.path.join(directory, "params")
    ocp.PyTreeCheckpointer().save(os.path.abspath(path), args=ocp.args.PyTreeSave({"params": tree}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, generated_root):
    """One weight file of each format, at the test config's model shapes (PaliGemma files with a
    300-row vocabulary, padded into the model's)."""
    root = tmp_path_factory.mktemp("sources")
    hf = _hf_model()
    hf.save_pretrained(root / "hf")
    npz = save_npz(root / "pg.npz", to_big_vision({k: v.numpy() for k, v in hf.state_dict().items()}))
    spec = specs.build(small_config(generated_root))
    other = VLA(spec.model, rngs=nnx.Rngs(7))  # another init: its weights differ from the run's own
    openpi = write_openpi_layout(other, str(root / "openpi"))
    imported = str(root / "imported")
    import_to_directory(spec, InitSource("big_vision", str(npz), vocab="pad"), imported)
    return dict(hf=str(root / "hf"), big_vision=str(npz), openpi=openpi, imported=imported)


@pytest.mark.parametrize("entries, overrides", [
    # openpi first, then the PaliGemma ViT and VLM over it: both leave their mark.
    # openpi weights come with openpi's prompts.
    ([dict(format="openpi", path="openpi"), dict(format="hf", path="hf", vocab="pad")],
     {"data.prompt_format": "openpi"}),
    # A LoRA fine-tune: the sources have no adapters, which keep their (zero-effect) init.
    ([dict(format="big_vision", path="big_vision", vocab="pad"),
      dict(format="vla", path="imported", exclude=("vit/.*",))],
     {"model.lora_rank": 4, "model.lora_targets": ("decoder/experts/1/",)}),
], ids=["openpi+hf", "big_vision+vla+lora"])
def test_first_step_loss_is_the_imported_models_loss(sources, generated_root, tmp_path, entries, overrides):
    init = tuple(dict(e, path=sources[e["path"]]) for e in entries)
    config = small_config(generated_root, total_steps=1, eval_batches=0, init=init, **overrides)
    run = train_lib.prepare(config, str(tmp_path))
    spec = run.spec

    # The imported model outside the trainer: unsharded, same seed, same sources.
    model = VLA(spec.model, rngs=nnx.Rngs(spec.train.seed))
    graphdef, state = nnx.split(model)
    params, reports = init_params(spec.train.init, spec.model, nnx.to_pure_dict(state))
    assert [r["format"] for r in reports] == [e["format"] for e in entries]
    assert all(r["imported"] for r in reports)
    if "model.lora_rank" in overrides:
        assert any(p.endswith("_lora_b") for p in reports[-1]["kept"])
    nnx.replace_by_pure_dict(state, params)
    for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(run.state["params"])[0],
                                    jax.tree.leaves(params)):
        # Imported tensors are bitwise equal; kept ones are the same init, jitted there, eager here.
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))

    first = next(iter(pipeline_lib.make_pipeline(spec.data, "train", process_index=0, process_count=1)))
    batch = jax.tree.map(jnp.asarray, first)
    rng = jax.random.fold_in(jax.random.key(spec.train.seed), 0)
    expected, _ = nnx.jit(lambda m, b, r: m.loss(b, r, len(run.data.names)))(nnx.merge(graphdef, state), batch, rng)

    final = train_lib.train(run)
    assert final["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert json.loads((tmp_path / "init.json").read_text()) == json.loads(json.dumps(reports))
