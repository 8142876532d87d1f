"""Vision-language examples from Meta-World scenes, labelled from simulator ground truth.

Four kinds per captured frame, each a canonical text example (images {cam: uint8 [1, H, W, 3]},
prompt, target, task, kind):
  caption  "caption en" -> which object, its color, where it is, the gripper state
  vqa      a question about the scene (object relative to the gripper, gripper open, drawer or
           door open, object color) -> short answer
  detect   "detect <label>" -> "<locYMIN><locXMIN><locYMAX><locXMAX> <label>"
  point    "point to the <thing>" -> "<locY><locX>"
Locations follow PaliGemma: 1024 bins per axis, y before x, bin = floor(coord / size * 1024)
of the pixel coordinate in the image as stored (after the corner-camera flip).
"""
from __future__ import annotations

import numpy as np

from data.metaworld_env import MetaWorldEnv

LOC_BINS = 1024
KINDS = ("caption", "vqa", "detect", "point")
_OPENABLE = ("drawer", "door", "window", "lid")


def loc_bin(coord: float, size: int) -> int:
    return int(np.clip(np.floor(coord / size * LOC_BINS), 0, LOC_BINS - 1))


def loc_center(bin_: int, size: int) -> float:
    """Pixel coordinate at the centre of a location bin (inverse of loc_bin)."""
    return (bin_ + 0.5) / LOC_BINS * size


def point_tokens(row: float, col: float, size: int) -> str:
    return f"<loc{loc_bin(row, size):04d}><loc{loc_bin(col, size):04d}>"


def box_tokens(box: np.ndarray, size: int) -> str:
    """box: [4] (ymin, xmin, ymax, xmax) in pixels."""
    return "".join(f"<loc{loc_bin(v, size):04d}>" for v in box)


def parse_loc_tokens(text: str) -> list[int]:
    """The bins of all <locNNNN> tokens in `text`, in order."""
    return [int(text[i + 4:i + 8]) for i in range(len(text)) if text.startswith("<loc", i)]


def _region(row: float, col: float, size: int) -> str:
    vertical = ("top", "middle", "bottom")[min(int(3 * row / size), 2)]
    horizontal = ("left", "center", "right")[min(int(3 * col / size), 2)]
    if (vertical, horizontal) == ("middle", "center"):
        return "center"
    return f"{vertical} {horizontal}"


def _relative(obj_rc: np.ndarray, grip_rc: np.ndarray, size: int) -> str:
    """Where the object appears relative to the gripper in the image."""
    d_row, d_col = obj_rc - grip_rc
    if max(abs(d_row), abs(d_col)) < size / 16:
        return "at the gripper"
    if abs(d_col) >= abs(d_row):
        return "to the left of the gripper" if d_col < 0 else "to the right of the gripper"
    return "above the gripper" if d_row < 0 else "below the gripper"


def scene_examples(env: MetaWorldEnv, camera: str, image: np.ndarray,
                   rng: np.random.Generator) -> list[dict]:
    """All four kinds of example for the env's current state seen from `camera`.
    image: uint8 [H, W, 3], the frame rendered at this state. Returns canonical text examples
    (detect/point ones are skipped when their object is out of view)."""
    size = image.shape[0]
    obj = env.main_object()
    grip_rc, obj_rc = env.project(np.stack([env.gripper_position(), obj.position]), camera)
    in_view = lambda rc: bool(np.all((rc >= 0) & (rc < size)))  # noqa: E731
    gripper_open = env.gripper_opening() > 0.6
    name = f"{obj.color} {obj.label}"

    caption = f"a robot arm at a table with a {name}"
    if in_view(obj_rc):
        caption += f" in the {_region(*obj_rc, size)} of the image"
    caption += f"; the gripper is {'open' if gripper_open else 'closed'}"

    questions = [(f"what color is the {obj.label}?", obj.color),
                 ("is the gripper open?", "yes" if gripper_open else "no")]
    if in_view(obj_rc) and in_view(grip_rc):
        questions.append((f"where is the {obj.label} relative to the gripper?",
                          _relative(obj_rc, grip_rc, size)))
    openness = env.articulation()
    if openness is not None and obj.label in _OPENABLE:
        questions.append((f"is the {obj.label} open?", "yes" if openness > 0.3 else "no"))
    if openness is not None and obj.label.endswith("button"):
        questions.append((f"is the {obj.label} pressed?", "yes" if openness > 0.5 else "no"))
    question, answer = questions[rng.integers(len(questions))]

    texts = [("caption", "caption en", caption), ("vqa", f"answer en {question}", answer)]
    box = env.object_box(obj, camera)
    if box is not None:
        texts.append(("detect", f"detect {obj.label}", f"{box_tokens(box, size)} {obj.label}"))
    targets = [("gripper", grip_rc), (obj.label, obj_rc)]
    thing, rc = targets[rng.integers(len(targets))]
    if in_view(rc):
        texts.append(("point", f"point to the {thing}", point_tokens(*rc, size)))
    frames = {camera: image[None]}
    return [{"images": frames, "prompt": p, "target": t, "task": env.task, "kind": k}
            for k, p, t in texts]
