"""Image-text TFDS datasets as canonical text examples (no TensorFlow needed to read).

Two uses: our own generated sources (scenes_vl, rollout_video), which are stored already in the
canonical layout, and real web datasets in a TFDS data_dir (coco_captions, a VQA set), read
through a `FieldMap` that says which feature is the image, how to build the prompt and which
feature is the answer/caption.

Canonical text example: images {cam: uint8 [T, h, w, 3]} (current/last frame last),
prompt: str, target: str, task: str.
"""
from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data.rlds import CorruptRecordError, encode_png, open_builder, shard_of
from data.transform import lookup


def text_features(cameras: Sequence[str], image_size: int) -> tfds.features.FeaturesDict:
    """On-disk layout of our canonical text examples (frames per example may vary)."""
    f = tfds.features
    image = f.Image(shape=(image_size, image_size, 3), encoding_format="png")
    return f.FeaturesDict({
        "images": f.FeaturesDict({cam: f.Sequence(image) for cam in cameras}),
        "prompt": f.Text(), "target": f.Text(), "task": f.Text(), "kind": f.Text(),
    })


def encode_text_example(example: dict[str, Any], cameras: Sequence[str]) -> dict[str, Any]:
    """Canonical example (images {cam: uint8 [T, H, W, 3]}) -> writable dict with PNG frames
    under every camera of the dataset's features (text_features(cameras)); a camera the
    example has no view from gets no frames (readers treat it as absent)."""
    images = example["images"]
    unknown = sorted(set(images) - set(cameras))
    if unknown:
        raise ValueError(f"text example has cameras {unknown} that the dataset ({list(cameras)}) lacks")
    return {**example, "images": {cam: [encode_png(f) for f in images.get(cam, ())] for cam in cameras}}


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where the parts of a canonical example live in a foreign dataset's features.
    Keys are '/'-separated feature paths; a sequence-valued text feature (several captions or
    answers) contributes its first element. `prompt` is a template whose {fields} are feature
    paths, e.g. "answer en {question}"."""
    image_key: str = "image"
    camera: str = "image"  # camera name the image is given under
    prompt: str = "caption en"
    target_key: str = "captions/text"
    task: str | None = None  # metrics label; default: the dataset name


COCO_CAPTIONS = FieldMap(image_key="image", prompt="caption en", target_key="captions/text")


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
        value = value[0] if len(value) else b""
    return value.decode() if isinstance(value, bytes) else str(value)


class ImageTextSource:
    """Random access to canonical text examples of one split.

    source: a dataset directory (ours: canonical layout, leave `fields` None) or the name of a
    registered TFDS dataset prepared in `data_dir` (give `fields`)."""

    def __init__(self, source: str, split: str = "train", data_dir: str | None = None,
                 fields: FieldMap | None = None):
        self.split, self.fields = split, fields
        if data_dir is None or os.path.exists(source):
            builder = open_builder(source)
            if split not in builder.info.splits:
                raise ValueError(f"{source!r} has no split {split!r}; splits: "
                                 f"{list(builder.info.splits)}")
        else:  # a registered dataset: TFDS itself reports a missing split or data_dir
            builder = tfds.builder(source, data_dir=data_dir)
        self.name = builder.info.name
        features = builder.info.features
        needed = ["images", "prompt", "target", "task"] if fields is None else \
            [fields.image_key, fields.target_key, *(
                name for _, name, _, _ in string.Formatter().parse(fields.prompt) if name)]
        for key in needed:
            try:
                lookup(features, key, "features")
            except KeyError:
                raise ValueError(f"{self.name!r} has no feature {key!r}; top-level features: "
                                 f"{list(features)}") from None
        self._builder = builder
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            record = self._source[index]
        except Exception as e:  # riegeli/proto/image decode errors surface as assorted types
            raise CorruptRecordError(self.name, index, None, e,
                                     shard_of(self._builder.info.splits[self.split], index)) from e
        if self.fields is None:
            return {"images": {cam: np.stack(frames).astype(np.uint8)
                               for cam, frames in record["images"].items() if len(frames)},
                    "prompt": _text(record["prompt"]), "target": _text(record["target"]),
                    "task": _text(record["task"])}
        f = self.fields
        values = {name: _text(lookup(record, name))
                  for _, name, _, _ in string.Formatter().parse(f.prompt) if name}
        image = np.asarray(lookup(record, f.image_key), np.uint8)
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
        return {"images": {f.camera: image[None]},
                "prompt": f.prompt.format_map(values),
                "target": _text(lookup(record, f.target_key)),
                "task": f.task or self.name}
