"""The policy: a raw observation -> an action chunk in the robot's native units.

    policy = Policy.from_bundle("BUNDLE")                     # a tools.export bundle; compiles at load
    policy = Policy.from_model(spec, model, ckpt_metadata)    # in memory (the trainer's eval hooks)
    out = policy.infer({"images": {"corner2": uint8 [h, w, 3]},   # or [t, h, w, 3], current frame last
                        "state": float [S], "prompt": "reach the goal"})
    out = policy.infer({"observation/image": ..., "observation/state": ..., "prompt": ...})
                                                 # the robot's own layout (metadata["robot_spec"])
    out["actions"]    f32 [H, A_robot] at metadata["control_hz"], the robot's units and layout
    out["subtask"]    str | None (π0.5: the subtask the model decoded first)
    out["infer_ms"]   this call's latency; policy.latency_stats() summarizes all calls since load

An observation comes in one of two layouts:
  - the robot's own (its raw keys, as the source's dataset spec declares them,
    metadata["robot_spec"]: e.g. openpi's LIBERO client's "observation/image", "observation/state",
    "prompt"), turned into cameras and canonical state by data/transform.observation, the same
    steps the training readers apply to the dataset's rows;
  - the model's: {"images": {camera: ...}, "state": canonical state [state_dim], "prompt"} (our
    simulators and vla.client send this; for Meta-World it is also the robot's).
An inference then builds the model's inputs exactly as the training pipeline builds a robot
example, through the same data/transform.model_example (data/sources.RobotSource), for the robot
source whose statistics the policy uses (metadata["source"]):

  1. each camera's frames resized with Layout.camera_frames (aspect-preserving bilinear, zero
     padding); with fewer frames than context_frames the missing past ones are masked
  2. state normalized with the source's statistics (data/normalize.py), padded to the model's
  3. the prompt tokenized by data/prompt.build_tokens: π0 "prompt\\n"; π0.5 "Task: prompt, State:
     <bins>;\\n" with the normalized state discretized into the prompt (in the run's
     data.prompt_format: "openpi" writes openpi's prompts, the bins as decimal text)
  4. π0.5 trained on subtasks: greedy decoding after the prompt gives "Subtask: ...\\n"; the
     subtask then goes in as the text target the actions were trained to follow (with "Action: |"
     around the FAST ids, which the action expert never sees, when the run had FAST targets)
  5. actions: the flow sampler from the given noise (bundle.action_sampler, the bundle's exported
     function); with prefix_actions, real-time chunking's guided sampling (vla/rtc.py weights);
     π0.5 stage 1 (flow_loss_weight 0): the FAST tokens generated after the subtask, decoded
  6. data/transform.robot_actions: the first action_dim dims unnormalized with the source's
     statistics, delta dims made absolute again, gripper and rotation back to the robot's units

Bad observations raise ValueError naming the problem (a server sends the message back).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs import specs as specs_lib
from data import fast_targets, normalize, storage, transform
from data import prompt as prompt_lib
from data.robots import get_spec
from data.tokenizer import Tokenizer
from vla import bundle as bundle_lib
from vla import rtc

OBSERVATION_KEYS = ("images", "state", "prompt")  # the model's layout; the robot's: metadata["robot_spec"]
# Every bad input raises ValueError, wrong types included: a server turns ValueError into an
# error reply (vla/serve.py), anything else is a bug of the policy.


def _text_generator(graphdef: nnx.GraphDef, max_new_tokens: int, eos_id: int):
    """generate(params, batch) -> (tokens int32 [B, N], mask bool [B, N]): greedy decoding."""

    def generate(params, batch):
        model = nnx.merge(graphdef, nnx.restore_int_paths(params))
        return model.generate_text(batch, max_new_tokens, eos_id)

    return generate


class Policy:
    """Observation -> action chunk for one model, one robot source; one inference at a time."""

    def __init__(self, spec: specs_lib.RunSpec, graphdef: nnx.GraphDef, params: Any,
                 metadata: dict[str, Any], tokenizer: Tokenizer, fast: Any = None, *, seed: int = 0,
                 warmup: bool = True):
        """Use from_bundle / from_model. spec: the run's (configs/specs.py); metadata:
        bundle.describe(...) and more; fast: the source's data/fast_targets.FastActions when
        actions come from FAST tokens."""
        if tokenizer.vocab_size != metadata["tokenizer_vocab_size"]:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids, the model "
                             f"was trained with {metadata['tokenizer_vocab_size']}")
        self.spec, self.metadata = spec, metadata
        self._layout = spec.data.layout
        self._norm = normalize.normalizers(metadata["stats"][metadata["source"]], metadata["normalization"])
        # Bundles exported before metadata carried the spec name it in their config.
        self.robot_spec = transform.DatasetSpec.from_fields(metadata["robot_spec"]) if "robot_spec" in metadata \
            else get_spec(spec.data.source(metadata["source"]).spec)
        metadata.setdefault("robot_action_dim", self.robot_spec.raw_action_dim(metadata["action_dim"]))
        self._tokenizer, self._fast, self._params = tokenizer, fast, params
        self._rng = np.random.default_rng(seed)
        self._sample = jax.jit(bundle_lib.action_sampler(graphdef, int(metadata["flow_steps"])))
        self._generate = jax.jit(_text_generator(graphdef, self._layout.max_len, tokenizer.eos_id))
        self.latencies_ms: list[float] = []
        self.warmup_s: float | None = None
        if warmup:
            self.warmup()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundle(cls, path: str, *, source: str | None = None, device: jax.Device | None = None,
                    seed: int = 0, warmup: bool = True) -> Policy:
        """A bundle written by tools.export, on one device (default: the first); a gs:// bundle
        is read from a local copy. source: another robot source of the run whose normalization
        to use."""
        path = storage.stage(path)  # SentencePiece and the FAST tokenizer read local files
        spec = specs_lib.build(bundle_lib.read_config(path))
        metadata = bundle_lib.read_json(path, bundle_lib.METADATA_FILE)
        if source is not None and source != metadata["source"]:
            metadata.update(bundle_lib.describe(spec, metadata, source))
        graphdef, _ = bundle_lib.abstract_model(bundle_lib.model_spec(spec, metadata))
        fast = None
        if metadata["actions_from"] == "fast":
            fast = _load_fast(os.path.join(path, bundle_lib.DATASETS_DIR, metadata["source"]), metadata)
        return cls(spec, graphdef, bundle_lib.read_params(path, device), metadata,
                   _tokenizer(os.path.join(path, bundle_lib.TOKENIZER_FILE), metadata, spec), fast,
                   seed=seed, warmup=warmup)

    @classmethod
    def from_model(cls, spec: specs_lib.RunSpec, model: nnx.Module, metadata: Mapping[str, Any], *,
                   source: str | None = None, step: int | None = None, seed: int = 0,
                   warmup: bool = True) -> Policy:
        """An in-memory model (any mesh). metadata: the checkpoint metadata {config, sources,
        tokenizer (path), tokenizer_vocab_size, fast_token_start, stats}; the data files it
        names must exist."""
        description = dict(bundle_lib.describe(spec, dict(metadata), source), step=step)
        graphdef, state = nnx.split(model)
        fast = None
        if description["actions_from"] == "fast":
            data = bundle_lib.data_as_run_saw_it(spec.data, dict(metadata))
            fast = _load_fast(data.dataset_dir(data.source(description["source"])), description)
        return cls(spec, graphdef, nnx.to_pure_dict(state), description,
                   _tokenizer(metadata["tokenizer"], description, spec), fast, seed=seed, warmup=warmup)

    def warmup(self) -> None:
        """Compiles every path inference takes (plain and guided sampling, text decoding) with a
        blank observation; the latency record starts empty afterwards."""
        start = time.perf_counter()
        m = self.metadata
        blank = {"images": {c: np.zeros((m["image_size"], m["image_size"], 3), np.uint8) for c in m["cameras"]},
                 "state": np.zeros(m["state_dim"], np.float32), "prompt": ""}
        self.infer(blank, rng_seed=0)
        if m["actions_from"] == "flow":
            self.infer(blank, rng_seed=0, prefix_actions=np.zeros((m["action_horizon"], m["action_dim"]),
                                                                  np.float32))
        self.latencies_ms.clear()
        self.warmup_s = time.perf_counter() - start

    # ------------------------------------------------------------------ inference

    def infer(self, observation: Mapping[str, Any], *, noise: np.ndarray | None = None,
              rng_seed: int | None = None, prefix_actions: np.ndarray | None = None,
              inference_delay: int = 0) -> dict[str, Any]:
        """One action chunk (see the module docstring).

        noise: f32 [H, A_model] (model_action_dim) starting point of the flow sampler; else drawn
        from rng_seed, else from the policy's own generator. prefix_actions: f32 [k, A_robot] in
        the robot's units (as returned), the previous chunk's actions for this chunk's steps 0..k-1 (k <= H), and
        inference_delay d <= k: sampling is guided toward them (weights 1 before d, decaying to 0
        at k). Returns {"actions": f32 [H, A_robot], "subtask": str | None, "infer_ms": float}.
        """
        start = time.perf_counter()
        example, bins, state = self._observe(observation)
        text = observation["prompt"]
        guide = self._guide(prefix_actions, inference_delay, state)
        noise = self._noise(noise, rng_seed)
        m = self.metadata
        subtask, generated = None, None
        if m["subtask"] or m["actions_from"] == "fast":
            generated = self._decode(example, text, bins)
            subtask = prompt_lib.parse_subtask(prompt_lib.decode_target(
                self._tokenizer, generated, np.ones(len(generated), bool)))
        if m["actions_from"] == "fast":
            actions = self._fast.decode_generated(self._tokenizer, generated)  # [H, A]
        else:
            tokens, subtask = self._action_tokens(text, bins, subtask)
            batch = _batched({**example, **tokens})
            guide = tuple(g[None] for g in guide)  # () without prefix_actions: plain sampling
            actions = np.asarray(self._sample(self._params, batch, noise[None], *guide))[0]
        actions = transform.robot_actions(self.robot_spec, actions, state, self._norm)
        ms = (time.perf_counter() - start) * 1e3
        self.latencies_ms.append(ms)
        return {"actions": actions, "subtask": subtask, "infer_ms": ms}

    def batch(self, observation: Mapping[str, Any], subtask: str | None = None) -> dict[str, np.ndarray]:
        """The action sampler's inputs for an observation (batch of 1, bundle.SAMPLE_KEYS; what
        the bundle's exported function takes), with a given subtask for π0.5 subtask models."""
        example, bins, _ = self._observe(observation)
        tokens, _ = self._action_tokens(observation["prompt"], bins, subtask)
        return _batched({**example, **tokens})

    def latency_stats(self) -> dict[str, float]:
        """Inference latency since load (warm-up excluded), milliseconds."""
        ms = np.asarray(self.latencies_ms, np.float64)
        if not ms.size:
            return {"count": 0}
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {"count": int(ms.size), "mean_ms": float(ms.mean()), "p50_ms": float(p50), "p90_ms": float(p90),
                "p99_ms": float(p99), "max_ms": float(ms.max())}

    # ------------------------------------------------------------------ inputs

    def _observe(self, observation: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
        """Validated observation (either layout) -> (example without tokens and actions, π0.5
        state bins int [S] or None, canonical state f32 [S])."""
        if not isinstance(observation, Mapping):
            kind = type(observation).__name__
            raise ValueError(f"observation must be a dict with {list(OBSERVATION_KEYS)} or the robot's keys, "  # noqa: TRY004
                             f"got {kind}")
        if "prompt" not in observation:
            raise ValueError("observation is missing ['prompt']")
        lay = self._layout
        if "images" in observation:
            images, state = self._model_layout(observation)
        else:
            images, state = transform.observation(self.robot_spec, observation)
        example = transform.model_example(lay, images, state, self._norm, self.robot_spec)
        normalized = example.pop("_state")
        bins = prompt_lib.state_bins(normalized, self.spec.data.prompt_format) if lay.pi05 else None
        prompt = observation["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")  # noqa: TRY004
        if self._tokens(prompt, bins, None)["truncated"]:
            raise ValueError(f"prompt too long: {len(self._tokenizer.encode(prompt))} tokens do not fit the "
                             f"model's max_text_tokens={lay.max_len} with the rest of its text")
        return example, bins, state

    def _model_layout(self, observation: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The model's layout {"images": {camera: ...}, "state": canonical [S]}, checked."""
        missing = [k for k in OBSERVATION_KEYS if k not in observation]
        if missing:
            raise ValueError(f"observation is missing {missing}")
        lay, m = self._layout, self.metadata
        images = observation["images"]
        if not isinstance(images, Mapping):
            kind = type(images).__name__
            raise ValueError(f"images must be a dict camera -> uint8 array, got {kind}")  # noqa: TRY004
        unknown = sorted(str(c) for c in images if c not in lay.cameras)
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; the policy's cameras are {list(lay.cameras)}")
        for cam in lay.cameras:
            if cam not in images:
                raise ValueError(f"camera {cam!r} missing from images; the cameras are {list(lay.cameras)}")
        frames = {cam: _frames(cam, images[cam]) for cam in lay.cameras}
        state = observation["state"]
        state = np.asarray(state) if not isinstance(state, np.ndarray) else state
        if state.dtype.kind not in "fiu":
            raise ValueError(f"state must be numeric, got dtype {state.dtype}")
        if state.shape != (m["state_dim"],):
            raise ValueError(f"state must have shape [{m['state_dim']}], got {list(state.shape)}")
        if not np.all(np.isfinite(state)):
            raise ValueError(f"state has non-finite values: {state.tolist()}")
        return frames, state.astype(np.float32)

    def _tokens(self, text: str, bins: np.ndarray | None, subtask: str | None) -> dict:
        """build_tokens as the training pipeline calls it for robot examples; with FAST targets
        the visible part of their target ("Action: |", the FAST ids being hidden from actions)."""
        fast = [] if self.metadata["fast_targets"] else None
        return prompt_lib.build_tokens(self._tokenizer, text, subtask, self._layout.max_len,
                                       state_bins=bins, fast_tokens=fast,
                                       prompt_format=self.spec.data.prompt_format)

    def _action_tokens(self, text: str, bins: np.ndarray | None, subtask: str | None
                       ) -> tuple[dict[str, np.ndarray], str | None]:
        """The sampler's tokens, with the subtask as target; a decoded subtask too long to fit
        beside the whole prompt loses words from its end. Returns (tokens, the subtask used)."""
        words = None if subtask is None else subtask.split(" ")
        while words is not None:
            try:
                out = self._tokens(text, bins, " ".join(words))
            except ValueError:  # the subtask alone exceeds max_text_tokens
                out = None
            if out is not None and not out["truncated"]:
                break
            words = words[:-1] if words else None
        if words is None:
            out = self._tokens(text, bins, None)
        keys = ("tokens", "token_mask", "target_mask")
        return {k: out[k] for k in keys}, None if words is None else " ".join(words)

    def _decode(self, example: dict, text: str, bins: np.ndarray | None) -> np.ndarray:
        """Greedy text after the prompt (π0.5 targets: subtask, FAST actions): model ids int [n],
        those outside the tokenizer's range dropped (an embedding may have spare rows)."""
        out = prompt_lib.build_tokens(self._tokenizer, text, None, self._layout.max_len, state_bins=bins,
                                      prompt_format=self.spec.data.prompt_format)
        batch = _batched({**example, **{k: out[k] for k in ("tokens", "token_mask", "target_mask")}})
        tokens, mask = (np.asarray(x)[0] for x in self._generate(self._params, batch))
        ids = tokens[mask]
        return ids[ids < self._tokenizer.vocab_size]

    def _noise(self, noise: np.ndarray | None, rng_seed: int | None) -> np.ndarray:
        shape = (self._layout.horizon, self._layout.action_dim)
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.shape != shape or not np.all(np.isfinite(noise)):
                raise ValueError(f"noise must be finite with shape {list(shape)}, got {list(noise.shape)}")
            return noise
        rng = self._rng if rng_seed is None else np.random.default_rng(rng_seed)
        return rng.standard_normal(shape, np.float32)

    def _guide(self, prefix_actions: np.ndarray | None, inference_delay: int, state: np.ndarray
               ) -> tuple[np.ndarray, ...]:
        """prefix_actions (robot units) -> (guide f32 [H, A_model] normalized as training normalized
        chunks at this canonical state, weights f32 [H, A_model]), or ()."""
        if isinstance(inference_delay, bool) or not isinstance(inference_delay, (int, np.integer)):
            kind = type(inference_delay).__name__
            raise ValueError(f"inference_delay must be an int, got {kind}")  # noqa: TRY004
        if prefix_actions is None:
            if inference_delay < 0:
                raise ValueError(f"inference_delay must be >= 0, got {inference_delay}")
            return ()
        m, h, a = self.metadata, self._layout.horizon, self._layout.action_dim
        if m["actions_from"] != "flow":
            raise ValueError("prefix_actions (real-time chunking) need the flow action head; this "
                             "model decodes its actions from FAST tokens")
        prefix = np.asarray(prefix_actions)
        if prefix.dtype.kind not in "fiu" or prefix.ndim != 2 or not 1 <= len(prefix) <= h \
                or prefix.shape[1] != m["robot_action_dim"]:
            raise ValueError(f"prefix_actions must be numeric [k, {m['robot_action_dim']}] with 1 <= k <= {h}, "
                             f"got {prefix.dtype} {list(prefix.shape)}")
        if not np.all(np.isfinite(prefix)):
            raise ValueError("prefix_actions has non-finite values")
        k = len(prefix)
        if not 0 <= inference_delay <= k:
            raise ValueError(f"inference_delay must be in [0, {k}] (the prefix length), got {inference_delay}")
        guide = np.zeros((h, a), np.float32)
        canonical = transform.delta(self.robot_spec, transform.actions_from_robot(self.robot_spec, prefix), state)
        guide[:k, :m["action_dim"]] = self._norm["actions"].normalize(canonical)
        weights = np.zeros((h, a), np.float32)  # padded action dims are not the robot's: unguided
        weights[:, :m["action_dim"]] = rtc.guidance_weights(h, int(inference_delay), k)[:, None]
        return guide, weights


def _frames(cam: str, image: Any) -> np.ndarray:
    """One camera's image uint8 [h, w, 3] or history [t, h, w, 3] -> [t, h, w, 3], checked."""
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise ValueError(f"images[{cam!r}] must be a numpy uint8 array, got {kind}")  # noqa: TRY004
    if image.dtype != np.uint8:
        raise ValueError(f"images[{cam!r}] must have dtype uint8, got {image.dtype}")
    if image.ndim not in (3, 4) or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"images[{cam!r}] must be [h, w, 3] or [t, h, w, 3] (RGB), got {list(image.shape)}")
    return image[None] if image.ndim == 3 else image


def _batched(example: dict) -> dict:
    """One example -> a batch of 1 (numpy)."""
    return jax.tree.map(lambda x: np.asarray(x)[None], example)


def _tokenizer(path: str, metadata: Mapping[str, Any], spec: specs_lib.RunSpec) -> Tokenizer:
    """The run's tokenizer, in its id layout, its FAST id range as wide as the model was trained with."""
    return Tokenizer.as_trained(path, spec.data.prompt_format, int(metadata["tokenizer_vocab_size"]),
                                metadata.get("fast_token_start"))


def _load_fast(dataset_dir: str, metadata: Mapping[str, Any]) -> fast_targets.FastActions:
    """The FAST tokenizer stage-1 π0.5 policies read their actions from."""
    return fast_targets.load(dataset_dir, int(metadata["action_horizon"]), float(metadata["control_hz"]),
                             metadata["normalization"])
