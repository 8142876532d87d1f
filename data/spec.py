"""What the input pipeline is asked for: typed specs of a run's data, built once from its config.

configs/specs.py builds these from a run config; nothing in data/ reads the config itself.

    DataSpec        the mixture: sources, window, example layout, prompt format, tokenizer,
                    normalization, FAST targets, seed and global batch size, readers
    SourceSpec      one mixture component (a config's data.sources.<name>)
    AugmentSpec     training-time image augmentation (applied by vla/augment.py in the step)
    FastSpec        π0.5 FAST action targets: whether on, and how to fit the tokenizer
    GenerationSpec  what tools.generate plays and renders (Meta-World tasks, episodes, cameras)
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from data import storage
from data.layout import Layout
from data.prompt import PROMPT_FORMATS
from data.stats import STATS_FILE
from data.windows import WindowSpec

KINDS = ("robot", "vl", "video", "tfds")
FORMATS = {"robot": ("rlds", "lerobot"), "vl": ("tfds", "webdataset", "parquet"),
           "video": ("tfds", "clips", "lerobot"), "tfds": ("tfds",)}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One mixture component.

    kind: robot (episodes with actions), vl (image-text), video (clips with text), tfds (any
    TFDS image-text dataset, data/tfds_image_text.py). format: how the files are laid out
    (FORMATS[kind]; None: the kind's first): robot "rlds" (data/rlds.py) | "lerobot"
    (data/lerobot.py); vl "tfds" (ours) | "webdataset" | "parquet" (data/web_image_text.py);
    video "tfds" (ours) | "clips" (mp4 files + captions, data/video_clips.py) | "lerobot" (a LeRobot
    dataset's videos without actions, tasks as captions, data/lerobot.clip_source). path: its dataset
    directory, relative to DataSpec.root unless absolute; with data_dir, the registered TFDS
    name. spec (robot): a data/robots.py dataset spec name or its fields. stats (robot): a
    stats.json, relative to DataSpec.root unless absolute (gs:// too), that replaces the
    dataset's own <path>/stats.json, e.g. an imported checkpoint's (data/stats.from_openpi).
    eval_split (robot): what the evaluation reads, a split name or "N%" (a hash hold-out of the
    train episodes, data/robot_data.py); None: DataSpec.eval_split. fields: where a foreign
    image-text source's image, prompt and target are (data/tfds_image_text.FieldMap fields).
    """

    name: str
    kind: str
    path: str
    weight: float
    spec: str | Mapping[str, Any] | None = None
    data_dir: str | None = None  # tfds: the data_dir of a registered dataset
    fields: Mapping[str, Any] | None = None
    stats: str | None = None
    format: str | None = None
    eval_split: str | None = None

    def __post_init__(self):
        if self.kind in FORMATS and self.format is not None and self.format not in FORMATS[self.kind]:
            raise ValueError(f"source {self.name!r}: format {self.format!r} is not one of kind "
                             f"{self.kind!r}'s formats {FORMATS[self.kind]}")

    @property
    def file_format(self) -> str:
        """format, or the kind's default."""
        return self.format or FORMATS[self.kind][0]

    def entry(self) -> dict[str, Any]:
        """The config entry this was built from, for messages."""
        out = dict(kind=self.kind, format=self.format, path=self.path, spec=self.spec, weight=self.weight,
                   data_dir=self.data_dir, fields=self.fields, stats=self.stats, eval_split=self.eval_split)
        return {k: v for k, v in out.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class FastSpec:
    """FAST action tokens as robot text targets (data/fast_targets.py). `enabled` asks tools.stats
    to fit them; the pipeline emits them in π0.5 mode only (DataSpec.fast_targets)."""

    enabled: bool = False
    vocab_size: int = 1024  # BPE pieces (token ids appended after the text vocabulary)
    scale: float = 10.0  # DCT coefficients are rounded to 1 / scale
    fit_chunks: int = 5000  # windows sampled from the train split to fit on


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Training-time image augmentation of robot examples (config.data.augment; the recipe and
    why it runs in the train step: vla/augment.py). Neutral values turn a part off."""

    crop_scale: float = 1.0  # the crop's side is drawn in [crop_scale, 1] of the image's
    rotate_degrees: float = 0.0  # rotation drawn in [-x, x] degrees
    brightness: float = 0.0  # each colour factor is drawn in [1 - x, 1 + x]
    contrast: float = 0.0
    saturation: float = 0.0
    color_only_cameras: tuple[str, ...] = ()  # e.g. wrist cameras: no crop or rotation

    def __post_init__(self):
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"config.data.augment.crop_scale={self.crop_scale} must be in (0, 1]")
        for name in ("rotate_degrees", "brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < (180.0 if name == "rotate_degrees" else 1.0):
                raise ValueError(f"config.data.augment.{name}={getattr(self, name)} is out of range "
                                 f"(rotate_degrees in [0, 180), colour amounts in [0, 1))")

    @property
    def geometric(self) -> bool:
        return self.crop_scale < 1.0 or self.rotate_degrees > 0.0

    @property
    def color(self) -> bool:
        return self.brightness > 0.0 or self.contrast > 0.0 or self.saturation > 0.0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.color


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The mixture of a run. sources are sorted by name: batch["source"] indexes them."""

    root: str | None  # None: not set (a config placeholder); reading data then fails
    sources: tuple[SourceSpec, ...]
    window: WindowSpec
    layout: Layout
    tokenizer: str  # SentencePiece model, relative to root unless absolute
    normalization: str  # quantile | meanstd (data/normalize.py)
    fast: FastSpec
    seed: int
    batch_size: int  # global
    workers: int = 0  # Grain worker processes; 0 reads in a thread
    prefetch: int = 2  # batches read ahead
    strict: bool = False  # re-raise bad records instead of skipping them
    # "vla": our prompts, special tokens appended to the vocabulary; "openpi": openpi's prompts,
    # FAST ids on the last SentencePiece pieces (data/prompt.py, data/tokenizer.py).
    prompt_format: str = "vla"
    # What the held-out evaluation reads of each robot source without its own eval_split: a split
    # name, or "N%" for a hash hold-out of N% of the train episodes (data/robot_data.py).
    eval_split: str = "heldout"
    augment: AugmentSpec = AugmentSpec()  # training only (vla/augment.py)

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"config.data.prompt_format={self.prompt_format!r}; expected one of "
                             f"{PROMPT_FORMATS}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source {name!r}; sources: {self.names}")

    @property
    def robot_sources(self) -> tuple[SourceSpec, ...]:
        return tuple(s for s in self.sources if s.kind == "robot")

    @property
    def robot_source_ids(self) -> tuple[int, ...]:
        """The batch["source"] values of the robot sources."""
        return tuple(i for i, s in enumerate(self.sources) if s.kind == "robot")

    @property
    def fast_targets(self) -> bool:
        """Whether robot examples carry FAST action tokens (π0.5 runs with fast.enabled)."""
        return self.layout.pi05 and self.fast.enabled

    def eval_split_of(self, source: SourceSpec) -> str:
        return source.eval_split or self.eval_split

    def dataset_dir(self, source: SourceSpec) -> str:
        """A source's dataset directory: its path, relative to root unless absolute."""
        return os.path.join(self._root(), source.path)

    def stats_file(self, source: SourceSpec) -> str:
        """The stats.json a robot source normalizes with: its `stats` (relative to root unless
        absolute or gs://), else the dataset's own <dataset dir>/stats.json."""
        if source.stats is None:
            return os.path.join(self.dataset_dir(source), STATS_FILE)
        if storage.is_remote(source.stats) or os.path.isabs(source.stats):
            return source.stats
        return os.path.join(self._root(), source.stats)

    def tokenizer_path(self) -> str:
        return os.path.join(self._root(), self.tokenizer)

    def _root(self) -> str:
        if self.root is None:
            raise ValueError("the data root is not set: give it as --config.data.root=DIR, the "
                             "directory the sources' paths are relative to")
        return self.root


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """What tools.generate writes: scripted-expert Meta-World episodes of `tasks`, rendered from
    `cameras` at image_size², and a SentencePiece tokenizer of tokenizer_vocab_size pieces."""

    tasks: tuple[str, ...]
    episodes_per_task: int
    heldout_episodes_per_task: int
    cameras: tuple[str, ...]
    image_size: int
    tokenizer_vocab_size: int
    seed: int
