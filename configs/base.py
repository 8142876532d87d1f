"""The config contract: the keys every run config has, so tools and launchers can rely on them.

Run configs (demo.py, pi0.py, pi05.py) start from `base_config()` and set their values; an
unknown override key is an error. Values here are neutral defaults; a placeholder (None) is a
value every run states itself, and configs/specs.py, the one reader of these keys, refuses a
run that leaves one unset, naming it.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from vla.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = placeholder(int)  # global
    c.total_steps = placeholder(int)
    c.log_every = 50
    c.checkpoint_every = 500
    c.eval_every = 500
    c.keep_checkpoints = 3  # newest checkpoints kept in WORKDIR/checkpoints
    c.eval_batches = 4  # held-out batches per evaluation (the same ones every time); 0 = none
    c.chip = "cpu"  # peak FLOP/s for MFU: a vla.cost.CHIPS name, or "cpu" (measured at start)
    # Weight sources applied in order after the random init of a new run (not on resume), e.g.
    # (dict(format="openpi", path="DIR/params"),) or (dict(format="vla", path=WORKDIR, step=N),):
    # format big_vision | hf | openpi | vla, path, and optional step (vla runs), vocab (exact |
    # truncate | pad) and exclude (regexes of parameters kept as initialized). vla/weights/load.py.
    c.init = ()

    # ---------------------------------------------------------------- knobs
    # The three knobs that trade against each other at inference time.
    c.knobs = ml_collections.ConfigDict()
    # Model size: named variants (see vla/models/variants.py).
    c.knobs.vit = placeholder(str)
    c.knobs.vlm = placeholder(str)
    c.knobs.action_expert = placeholder(str)
    # Context length: frames of history per camera (current frame last), their spacing in
    # seconds, tokens each past frame is pooled to, and the text token budget.
    c.knobs.context_frames = 1
    c.knobs.context_stride_s = 0.25
    c.knobs.past_frame_tokens = 4
    c.knobs.max_text_tokens = placeholder(int)
    # Control frequency: robot control rate, chunk length in seconds (the action horizon is
    # configs.specs.action_horizon(chunk_s, control_hz)), actions executed per inference, Euler
    # steps of the flow sampler.
    c.knobs.control_hz = placeholder(float)
    c.knobs.chunk_s = placeholder(float)
    c.knobs.steps_executed = placeholder(int)
    c.knobs.flow_steps = 10

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.mode = "pi0"  # "pi0": continuous state token; "pi05": state bins in prompt + adaRMS
    c.model.image_size = placeholder(int)
    c.model.cameras = placeholder(tuple)  # camera names: the batch's images[cam] keys
    c.model.state_dim = placeholder(int)  # padded proprio dim
    c.model.action_dim = placeholder(int)  # padded action dim
    # Embedding rows: at least the tokenizer's vocab_size (prompt_format "vla": text pieces + the
    # 1280 loc/state tokens it lacks + FAST; "openpi": the SentencePiece pieces, 257,152 for PaliGemma).
    c.model.vocab_size = placeholder(int)
    c.model.knowledge_insulation = False
    c.model.flow_loss_weight = 1.0
    c.model.text_loss_weight = 1.0
    # Text positions whose vocabulary logits are live at once (0: all). Off by default: at π0.5's
    # shapes on a v5p-8 XLA's own schedule needed less HBM unchunked (BENCHMARKS.md, tools.aot).
    c.model.text_loss_chunk = 0
    c.model.param_dtype = "float32"  # "bfloat16" halves parameter, gradient and EMA memory
    c.model.compute_dtype = "float32"
    # What the backward pass keeps of each scanned layer (vla/models/layers.py REMAT_POLICIES):
    # nothing_saveable (least memory, recomputes the layer), dots_with_no_batch_dims_saveable,
    # offload_dots_with_no_batch_dims (the same dots kept in host memory), dots_saveable,
    # everything_saveable, none. python -m tools.aot --sweep compares them on a TPU topology.
    c.model.remat_policy = "nothing_saveable"
    c.model.scan_layers = True
    # LoRA (vla/models/lora.py): low-rank adapters W + (alpha / rank) A B on the chosen expert
    # projections; with any, only adapters (and optimizer.also_train) train, less optimizer.freeze,
    # and tools.export merges them. lora_targets: regexes over "decoder/experts/<e>/<q_einsum|kv_einsum|attn_vec_einsum|
    # gating_einsum|linear>", e.g. ("decoder/experts/1/",) = every projection of the action expert.
    c.model.lora_rank = 0  # 0 = off
    c.model.lora_alpha = 16.0
    c.model.lora_targets = ()

    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.root = placeholder(str)  # source paths are relative to it
    # What tools.generate plays and renders (Meta-World scripted experts); () = nothing.
    c.data.tasks = ()
    c.data.episodes_per_task = 0
    c.data.heldout_episodes_per_task = 0
    c.data.render_cameras = ()
    c.data.tokenizer = "tokenizer.model"  # relative to data.root
    c.data.tokenizer_vocab_size = 512  # text pieces the generator's SentencePiece model learns
    c.data.normalization = "quantile"  # or "meanstd"
    # Prompt text and token ids (data/prompt.py, data/tokenizer.py): "vla" (ours: state bins as
    # <stateNNN> tokens, special tokens and FAST ids appended after the SentencePiece pieces) or
    # "openpi" (openpi's π0 / π0.5 prompts, state as decimal text, FAST ids on the last pieces as
    # π0-FAST: the tokenizer's vocab_size is its piece count, 257,152 for PaliGemma's).
    c.data.prompt_format = "vla"
    # π0.5 robot targets: FAST action tokens after the subtask. tools.stats (and tools.generate)
    # fit the FAST tokenizer at the knobs' horizon and rate; the pipeline uses it in pi05 mode.
    c.data.fast_targets = False
    c.data.fast_vocab_size = 1024  # FAST BPE pieces (token ids appended after the text vocab)
    c.data.fast_scale = 10.0  # DCT coefficients are rounded to 1 / fast_scale
    c.data.fast_fit_chunks = 5000  # windows sampled from the train split to fit on
    # The mixture: name -> dict(kind=robot|vl|video|tfds, format=... (robot: rlds | lerobot; vl:
    # tfds | webdataset | parquet; video: tfds | clips), path=..., weight=..., spec=... (robot: a
    # data/robots.py dataset spec name or its fields), stats=... (robot: a stats.json, relative to
    # data.root or absolute, replacing the dataset's own, e.g. an imported checkpoint's),
    # eval_split=... (robot, overrides data.eval_split), data_dir=..., fields=... (foreign
    # image-text sources: data/tfds_image_text.FieldMap fields)). data/spec.SourceSpec says more.
    c.data.sources = ml_collections.ConfigDict()
    # What held-out evaluation reads of each robot source: a split name ("heldout", "val"), or
    # "N%" for a deterministic hash hold-out of N% of the train episodes (datasets with only
    # "train", as most of Open X-Embodiment), which training then leaves out.
    c.data.eval_split = "heldout"
    # Training-time image augmentation of robot examples, drawn per (seed, step, row) inside the
    # train step (vla/augment.py); off at these neutral values. openpi's π0 recipe: crop_scale
    # 0.95, rotate_degrees 5, brightness 0.3, contrast 0.4, saturation 0.5, wrist cameras
    # color-only.
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.crop_scale = 1.0
    c.data.augment.rotate_degrees = 0.0
    c.data.augment.brightness = 0.0
    c.data.augment.contrast = 0.0
    c.data.augment.saturation = 0.0
    c.data.augment.color_only_cameras = ()
    c.data.workers = 0  # Grain worker processes; 0 reads in a thread
    c.data.prefetch = 2  # batches read ahead
    c.data.strict = False  # a bad record raises (naming dataset, episode, step) instead of skipping

    # ---------------------------------------------------------------- closed-loop evaluation
    # Meta-World success rates during training (vla/sim_eval.py, LeRobot's protocol), run by the
    # evaluator: `every` must be a multiple of eval_every, and eval_batches > 0. The same command
    # on an exported bundle: python -m tools.eval --bundle BUNDLE --tasks ... --episodes N.
    c.sim_eval = ml_collections.ConfigDict()
    c.sim_eval.tasks = ()  # task and group names (mt10, mt50, easy, medium, hard, very_hard); () = off
    c.sim_eval.episodes = 10  # per task, seeded by (seed, task name, episode index)
    c.sim_eval.seed = 0  # scene seeds: keep it fixed to compare runs on the same scenes
    c.sim_eval.every = 1000  # training steps between evaluations (and at the last step)
    c.sim_eval.max_steps = 500  # env steps at 80 Hz per episode (Meta-World's max_path_length)
    c.sim_eval.gif_episodes = 1  # first episodes per task saved as GIFs in WORKDIR/sim_eval/step_N
    c.sim_eval.mode = "sync"  # vla.rtc.ChunkExecutor: sync | naive | rtc
    c.sim_eval.inference_delay = 0  # control ticks an inference takes (naive / rtc)
    # tools.benchmark's last stage: the exported bundle on `final_episodes` episodes a task for
    # each scene seed in `final_seeds` (other seeds than the one above, so nothing was chosen on
    # them), with the first `failure_gifs` failures of each task saved as GIFs.
    c.sim_eval.final_episodes = 30
    c.sim_eval.final_seeds = (1, 2)
    c.sim_eval.failure_gifs = 2

    # ---------------------------------------------------------------- metrics
    # metrics.jsonl, TensorBoard and loss.png in the workdir are always written (vla/metrics.py);
    # Weights & Biases beside them when a project is set (pip install -e ".[wandb]"). The run id
    # is kept in WORKDIR/wandb_run_id, so a resumed job continues the same W&B run.
    c.metrics = ml_collections.ConfigDict()
    c.metrics.wandb_project = ""  # "" = no W&B
    c.metrics.wandb_entity = ""  # team or user; "" = your default entity
    c.metrics.wandb_name = ""  # the run's display name; "" = the workdir's basename
    # online | offline (upload later with wandb sync) | disabled; "" = $WANDB_MODE, else online
    c.metrics.wandb_mode = ""
    c.metrics.wandb_tags = ()

    # ---------------------------------------------------------------- optimizer / mesh
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000  # linear warmup, then cosine decay to lr * min_lr_ratio
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-4
    c.optimizer.clip_norm = 1.0
    c.optimizer.mu_dtype = ""  # AdamW's first moment: "" = the parameters' dtype, or "bfloat16"
    c.optimizer.ema_decay = 0.999  # 0 = no EMA; evaluation uses the EMA weights when on
    c.optimizer.grad_accum_steps = 1  # microbatches per step (batch_size is the global batch)
    c.optimizer.freeze = ()  # regexes over parameter paths ("vit/.*", "decoder/experts/0/")
    # With LoRA, the non-adapter parameters that train too (openpi trains the ViT and the action
    # and time projections beside the adapters): regexes, e.g. ("vit/", "action_", "state_proj").
    c.optimizer.also_train = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Multislice (TPU slices over the data-center network): slices each axis spans; the sizes
    # above are then per slice. launch.tpu --slices=N puts all N on dcn_data unless set here.
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1
    # Logical axis -> mesh axes (vla/sharding.py); its "batch" entry splits every batch.
    c.sharding_rules = DEFAULT_RULES
    return c
