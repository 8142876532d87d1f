"""Bundles and the Policy: export, the exported function without model code, one-device loading,
bfloat16, input validation, real-time chunking guidance, π0.5 subtask and FAST paths."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import specs
from data import prompt as prompt_lib
from data import robot_data, sources
from data.layout import resize_with_pad
from data.normalize import normalizers
from data.tokenizer import Tokenizer
from tests.policy_fixtures import TRAINED_STEPS, trained_config
from vla import bundle as bundle_lib
from vla import sharding
from vla import train as train_lib
from vla.models.vla import VLA
from vla.policy import Policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "press the button from the top"


def observation(seed: int = 0, size: tuple[int, int] = (40, 56)) -> dict:
    """A raw observation: an image of another size and aspect than the model's, native state."""
    rng = np.random.default_rng(seed)
    return {"images": {"corner2": rng.integers(0, 256, (*size, 3), dtype=np.uint8)},
            "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32) + 0.05 * rng.standard_normal(4, np.float32),
            "prompt": PROMPT}


def robot_example(config, root: str, tokenizer, fast=None, index: int = 25) -> tuple[dict, dict, str | None]:
    """(the training pipeline's heldout example at `index`, the raw observation it was made of,
    its recorded subtask)."""
    data = dataclasses.replace(specs.build(config).data, root=root)
    src = data.source("metaworld")
    source = sources.make_source(src, data, "eval", tokenizer, fast)
    episode, step = source.locate(index)
    ep = robot_data.open_robot(data.dataset_dir(src), src.spec, "rlds", "eval").episode(episode)
    raw = ep.steps([step])
    obs = {"images": {c: f[0] for c, f in raw["images"].items() if c in data.layout.cameras},
           "state": raw["state"][0], "prompt": ep.instruction}
    return source[index], obs, raw.get("subtask", [None])[0]


def assert_same_inputs(batch: dict, example: dict, keys=("tokens", "token_mask", "target_mask")) -> None:
    for cam, frames in example["images"].items():
        np.testing.assert_array_equal(batch["images"][cam][0], frames)
    for key in ("image_mask", "frame_mask", *keys):
        np.testing.assert_array_equal(batch[key][0], example[key], err_msg=key)
    np.testing.assert_allclose(batch["state"][0], example["state"], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def policy(bundle_dir) -> Policy:
    return Policy.from_bundle(bundle_dir)


@pytest.fixture(scope="module")
def noise(policy) -> np.ndarray:
    m = policy.metadata
    return np.random.default_rng(7).standard_normal((m["action_horizon"], m["model_action_dim"]), np.float32)


def test_bundle_describes_itself(bundle_dir, trained_workdir):
    assert sorted(os.listdir(bundle_dir)) == sorted([bundle_lib.PARAMS_DIR, bundle_lib.CONFIG_FILE,
                                                     bundle_lib.METADATA_FILE, bundle_lib.TOKENIZER_FILE,
                                                     bundle_lib.EXPORT_FILE])
    m = bundle_lib.read_json(bundle_dir, bundle_lib.METADATA_FILE)
    assert (m["step"], m["weights"], m["dtype"], m["batch_size"]) == (TRAINED_STEPS, "ema", "float32", 1)
    assert (m["mode"], m["source"], m["state_dim"], m["action_dim"]) == ("pi0", "metaworld", 4, 4)
    assert (m["action_horizon"], m["control_hz"], m["cameras"], m["image_size"]) == (10, 20.0, ["corner2"], 32)
    assert m["mixture"] == {"metaworld": 0.8, "rollout_video": 0.1, "scenes_vl": 0.1}
    assert set(m["stats"]["metaworld"]) >= {"state", "actions"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=False, capture_output=True,
                          text=True).stdout.strip()
    assert m["code_version"] == (head or None)
    assert m["signature"]["batch"]["images"]["corner2"] == {"shape": [1, 1, 32, 32, 3], "dtype": "uint8"}
    assert m["signature"]["noise"]["shape"] == [1, 10, 4]
    with open(os.path.join(trained_workdir, "config.json")) as f:
        assert bundle_lib.read_config(bundle_dir).knobs.to_dict() == json.load(f)["knobs"]


def test_one_device_runtime_matches_the_policy(policy, bundle_dir, noise, tmp_path):
    """In a process with ONE device (the checkpoint was trained on 8): the exported function called
    with only jax and orbax (no model code imported), then Policy.from_bundle (TensorFlow never
    imported); both must give the in-process policy's actions."""
    obs = observation()
    expected = policy.infer(obs, noise=noise)["actions"]
    batch = policy.batch(obs)
    np.savez(tmp_path / "inputs.npz", noise=noise, image=obs["images"]["corner2"], state=obs["state"],
             **{f"batch/{k}": v for k, v in batch.items() if k != "images"},
             **{f"images/{c}": v for c, v in batch["images"].items()})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", ONE_DEVICE_SCRIPT, bundle_dir, str(tmp_path), PROMPT], cwd=REPO,
                         env=env, check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = np.load(tmp_path / "outputs.npz")
    assert int(result["devices"]) == 1
    stats = normalizers(policy.metadata["stats"]["metaworld"], policy.metadata["normalization"])
    np.testing.assert_allclose(stats["actions"].unnormalize(result["raw"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["actions"], expected, rtol=1e-5, atol=1e-5)


ONE_DEVICE_SCRIPT = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp

bundle, io, prompt = sys.argv[1:]
inputs = dict(np.load(io + "/inputs.npz"))
exported = jax.export.deserialize(bytearray(open(bundle + "/inference.jax_export", "rb").read()))
ckpt, one = ocp.PyTreeCheckpointer(), jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                      ckpt.metadata(bundle + "/params").item_metadata.tree)
params = ckpt.restore(bundle + "/params", args=ocp.args.PyTreeRestore(
    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
batch = {k.split("/")[1]: v for k, v in inputs.items() if k.startswith("batch/")}
batch["images"] = {k.split("/")[1]: v for k, v in inputs.items() if k.startswith("images/")}
raw = np.asarray(exported.call(params, batch, inputs["noise"][None]))[0, :, :4]
assert not [m for m in sys.modules if m.split(".")[0] in ("vla", "data", "flax")], "model code imported"

from vla.policy import Policy
assert "tensorflow" not in sys.modules  # the evaluator renders MuJoCo in this process
policy = Policy.from_bundle(bundle, warmup=False)
obs = {"images": {"corner2": inputs["image"]}, "state": inputs["state"], "prompt": prompt}
actions = policy.infer(obs, noise=inputs["noise"])["actions"]
np.savez(io + "/outputs.npz", raw=raw, actions=actions, devices=jax.device_count())
"""


def test_infer_output_latency_and_determinism(policy, noise):
    obs = observation()
    out = policy.infer(obs, rng_seed=3)
    assert out["actions"].shape == (10, 4) and out["actions"].dtype == np.float32
    assert np.all(np.isfinite(out["actions"])) and out["subtask"] is None and out["infer_ms"] > 0
    np.testing.assert_array_equal(policy.infer(obs, rng_seed=3)["actions"], out["actions"])
    assert not np.allclose(policy.infer(obs, rng_seed=4)["actions"], out["actions"])
    np.testing.assert_array_equal(policy.infer(obs, noise=noise)["actions"], policy.infer(obs, noise=noise)["actions"])
    # Histories of any length: a longer one keeps the last context_frames (here 1) frames.
    history = np.stack([observation(1)["images"]["corner2"], obs["images"]["corner2"]])
    np.testing.assert_array_equal(policy.infer({**obs, "images": {"corner2": history}}, rng_seed=3)["actions"],
                                  out["actions"])
    stats = policy.latency_stats()
    assert stats["count"] == len(policy.latencies_ms) >= 6 and 0 < stats["p50_ms"] <= stats["max_ms"]
    assert policy.warmup_s > 0


def test_inputs_are_the_training_pipelines_example(policy, generated_root):
    """The raw step a heldout training example was cut from, given to the policy, becomes that
    example: images, masks, normalized state and prompt tokens."""
    config = trained_config(generated_root)
    example, obs, _ = robot_example(config, generated_root, Tokenizer(os.path.join(generated_root, "tokenizer.model")))
    assert_same_inputs(policy.batch(obs), example)


def test_images_are_resized_as_training_resizes_them(policy):
    obs = observation(size=(40, 56))
    batch = policy.batch(obs)
    np.testing.assert_array_equal(batch["images"]["corner2"][0, 0], resize_with_pad(obs["images"]["corner2"], 32))
    assert batch["image_mask"].tolist() == [[True]] and batch["frame_mask"].tolist() == [[[True]]]
    text = policy._tokenizer.decode(batch["tokens"][0][batch["token_mask"][0]])
    assert text == PROMPT + "\n" and not batch["target_mask"].any()


def test_real_time_chunking_guidance_pulls_toward_the_prefix(policy, noise):
    obs = observation()
    previous = policy.infer(obs, rng_seed=11)["actions"]
    prefix, delay = previous[5:], 3
    free = policy.infer(obs, noise=noise)["actions"]
    guided = policy.infer(obs, noise=noise, prefix_actions=prefix, inference_delay=delay)["actions"]
    gap = lambda a: np.abs(a[:delay] - prefix[:delay]).mean()
    assert gap(guided) < 0.5 * gap(free)
    np.testing.assert_array_equal(
        guided, policy.infer(obs, noise=noise, prefix_actions=prefix, inference_delay=delay)["actions"])


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("state"), r"missing \['state'\]"),
    (lambda o: o["images"].pop("corner2"), "camera 'corner2' missing"),
    (lambda o: o["images"].update(wrist=o["images"]["corner2"]), r"unknown camera\(s\) \['wrist'\]"),
    (lambda o: o["images"].update(corner2=o["images"]["corner2"].astype(np.float32)), "dtype uint8"),
    (lambda o: o["images"].update(corner2=o["images"]["corner2"][..., :1]), r"\[h, w, 3\]"),
    (lambda o: o["images"].update(corner2=o["images"]["corner2"][0]), r"\[h, w, 3\]"),
    (lambda o: o["images"].update(corner2=[[0]]), "numpy uint8 array"),
    (lambda o: o.update(state=np.zeros(5)), r"state must have shape \[4\]"),
    (lambda o: o.update(state=np.array([0.0, np.nan, 0.0, 0.0])), "non-finite"),
    (lambda o: o.update(state=np.array(["a", "b", "c", "d"])), "numeric"),
    (lambda o: o.update(prompt=7), "prompt must be a string"),
    (lambda o: o.update(prompt="press the button " * 20), "prompt too long"),
])
def test_bad_observations_are_named(policy, change, message):
    obs = observation()
    change(obs)
    with pytest.raises(ValueError, match=message):
        policy.infer(obs)


def test_bad_options_are_named(policy):
    obs = observation()
    for kwargs, message in [
        ({"noise": np.zeros((10, 3))}, "noise must be finite with shape"),
        ({"prefix_actions": np.zeros((11, 4))}, r"prefix_actions must be numeric \[k, 4\]"),
        ({"prefix_actions": np.zeros((5, 2))}, r"prefix_actions must be numeric \[k, 4\]"),
        ({"prefix_actions": np.full((5, 4), np.inf)}, "non-finite"),
        ({"prefix_actions": np.zeros((5, 4)), "inference_delay": 6}, r"inference_delay must be in \[0, 5\]"),
        ({"inference_delay": 1.5}, "inference_delay must be an int"),
    ]:
        with pytest.raises(ValueError, match=message):
            policy.infer(obs, **kwargs)


def test_from_model_agrees_with_from_bundle(policy, bundle_dir, trained_workdir, generated_root, noise):
    """The trainer's situation: a model sharded over a 2 x 4 (data, fsdp) mesh of the 8 devices and
    the checkpoint's metadata."""
    spec = specs.build(trained_config(generated_root))
    with open(os.path.join(trained_workdir, "checkpoints", str(TRAINED_STEPS), "metadata", "metadata")) as f:
        metadata = json.load(f)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    graphdef, _, shardings = sharding.abstract_model(
        lambda: VLA(bundle_lib.model_spec(spec, metadata), rngs=nnx.Rngs(0)), mesh, spec.mesh.rules)
    params = jax.device_put(nnx.restore_int_paths(bundle_lib.read_params(bundle_dir)), nnx.to_pure_dict(shardings))
    assert not params["decoder"]["embedder"].sharding.is_fully_replicated
    in_memory = Policy.from_model(spec, nnx.merge(graphdef, params), metadata, step=TRAINED_STEPS, warmup=False)
    obs = observation()
    np.testing.assert_allclose(in_memory.infer(obs, noise=noise)["actions"], policy.infer(obs, noise=noise)["actions"],
                               rtol=1e-5, atol=1e-5)
    same = {k: v for k, v in policy.metadata.items() if k in in_memory.metadata}
    assert {k: in_memory.metadata[k] for k in same} == same
    assert json.dumps(policy.metadata) and json.dumps(in_memory.metadata)  # servers send it to clients


def test_bfloat16_export_on_the_command_line(policy, trained_workdir, noise, tmp_path):
    out = str(tmp_path / "bf16")
    run = subprocess.run([sys.executable, "-m", "tools.export", "--workdir", trained_workdir, "--step",
                          str(TRAINED_STEPS), "--out", out, "--dtype", "bfloat16"],
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"restoring ema of step {TRAINED_STEPS}" in run.stdout and f"bundle written to {out}" in run.stdout
    assert {str(x.dtype) for x in jax.tree.leaves(bundle_lib.read_params(out))} == {"bfloat16"}
    bf16 = Policy.from_bundle(out, warmup=False)
    assert (bf16.metadata["dtype"], bf16.metadata["step"]) == ("bfloat16", TRAINED_STEPS)
    obs = observation()
    a, b = (p.infer(obs, noise=noise)["actions"] for p in (policy, bf16))
    scale = normalizers(policy.metadata["stats"]["metaworld"], "quantile")["actions"].scale
    assert np.abs(a - b).max() < 0.05 * scale.max()
    assert not np.array_equal(a, b)  # the weights really were rounded
    with pytest.raises(FileExistsError, match="overwrite"):
        bundle_lib.export(trained_workdir, out)


def test_missing_runs_and_steps_are_named(trained_workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bundle_lib.export(str(tmp_path / "nowhere"), str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        bundle_lib.export(str(tmp_path), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"no checkpoint at step 3; available steps: \[2, 4\]"):
        bundle_lib.export(trained_workdir, str(tmp_path / "b"), step=3)
    with pytest.raises(ValueError, match="dtype"):
        bundle_lib.export(trained_workdir, str(tmp_path / "b"), dtype="float16")
    assert not os.path.exists(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        Policy.from_bundle(str(tmp_path))


# ------------------------------------------------------------------------------- π0.5

@pytest.fixture(scope="module")
def pi05_run(generated_root, tmp_path_factory):
    """A π0.5 stage-1 run (FAST targets, no flow head) saved at its initialization, exported."""
    workdir = str(tmp_path_factory.mktemp("pi05"))
    config = trained_config(generated_root, **{"model.mode": "pi05", "model.flow_loss_weight": 0.0,
                                               "knobs.max_text_tokens": 80, "model.vocab_size": 4096})
    run = train_lib.prepare(config, workdir)
    run.ckpt.save(1, run.state, run.data, run.metadata)
    run.ckpt.wait()
    run.ckpt.close()
    out = bundle_lib.export(workdir, os.path.join(workdir, "bundle"), progress=lambda _: None)
    return config, run, out


def test_pi05_stage1_reads_actions_from_generated_fast_tokens(pi05_run):
    _, _, bundle = pi05_run
    assert os.path.isfile(os.path.join(bundle, "datasets", "metaworld", "fast", "h10_20hz", "meta.json"))
    policy = Policy.from_bundle(bundle)
    assert (policy.metadata["actions_from"], policy.metadata["subtask"]) == ("fast", True)
    obs = observation()
    out = policy.infer(obs, rng_seed=0)
    assert out["actions"].shape == (10, 4) and np.all(np.isfinite(out["actions"]))
    assert out["subtask"] is None or isinstance(out["subtask"], str)
    # Greedy decoding: the sampling noise plays no part.
    np.testing.assert_array_equal(policy.infer(obs, rng_seed=1)["actions"], out["actions"])
    with pytest.raises(ValueError, match="FAST"):
        policy.infer(obs, prefix_actions=out["actions"])


def test_pi05_subtask_policy_conditions_actions_on_the_subtask(pi05_run):
    config, run, _ = pi05_run
    posttrain = config.copy_and_resolve_references()
    posttrain.model.flow_loss_weight = 1.0
    policy = Policy.from_model(specs.build(posttrain), nnx.merge(run.graphdef, run.state["params"]), run.metadata,
                               warmup=False)
    assert (policy.metadata["actions_from"], policy.metadata["subtask"]) == ("flow", True)
    obs = observation()
    out = policy.infer(obs, rng_seed=0)
    assert out["actions"].shape == (10, 4) and np.all(np.isfinite(out["actions"]))
    assert out["subtask"] is None or isinstance(out["subtask"], str)
    # The recorded subtask of a training example in, the example's inputs out, but for the FAST
    # ids of its target, which the action expert never sees.
    data = run.data
    example, raw, recorded = robot_example(config, config.data.root, data.tokenizer,
                                           data.fast["metaworld"])
    assert recorded
    batch = policy.batch(raw, subtask=recorded)
    assert_same_inputs(batch, example, keys=())
    fast = np.array([data.tokenizer.is_fast(int(t)) for t in example["tokens"]])
    for key in ("tokens", "target_mask"):
        np.testing.assert_array_equal(batch[key][0][batch["token_mask"][0]],
                                      example[key][example["token_mask"] & ~fast], err_msg=key)
    # The subtask is the text target the actions follow, laid out as in training.
    tok = policy._tokenizer
    batch = policy.batch(obs, subtask="move to the button")
    tokens, valid, target = batch["tokens"][0], batch["token_mask"][0], batch["target_mask"][0]
    assert prompt_lib.decode_target(tok, tokens, target) == "Subtask: move to the button\nAction: |"
    assert tok.decode(tokens[valid & ~target]).startswith("Task: " + PROMPT + ", State: <state")
    # A subtask too long for the text budget loses words, never the instruction.
    long = policy.batch(obs, subtask="press " * 100)
    text = tok.decode(long["tokens"][0][long["token_mask"][0]])
    assert PROMPT in text and 1 < text.count("press") < 100
