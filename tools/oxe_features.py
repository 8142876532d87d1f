"""Open X-Embodiment datasets' feature structures, as the TFDS catalog states them, for writing
small datasets of exactly their shape (tests/test_convert_rlds.py, tools/make_bench_data.py).

Transcribed from tensorflow/datasets docs/catalog/bridge.md, fractal20220817_data.md and droid.md:
the rtx.py builders fetch their features from GCS at run time, so this is the closest offline
source. Images keep their real shapes (an Image feature checks them).
"""
import numpy as np
import tensorflow_datasets as tfds

f = tfds.features
STRING = np.str_  # the catalog's "string": Tensor(shape=(), dtype=string)


def bridge_features() -> f.FeaturesDict:
    return f.FeaturesDict({
        "episode_metadata": f.FeaturesDict({
            "episode_id": f.Scalar(dtype=np.int32), "file_path": f.Tensor(shape=(), dtype=STRING),
            **{f"has_image_{i}": f.Scalar(dtype=np.bool_) for i in range(4)},
            "has_language": f.Scalar(dtype=np.bool_)}),
        "steps": f.Dataset({
            "action": f.Tensor(shape=(7,), dtype=np.float32),
            "discount": f.Scalar(dtype=np.float32),
            "is_first": f.Tensor(shape=(), dtype=np.bool_), "is_last": f.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": f.Tensor(shape=(), dtype=np.bool_),
            "language_embedding": f.Tensor(shape=(512,), dtype=np.float32),
            "language_instruction": f.Tensor(shape=(), dtype=STRING),
            "observation": f.FeaturesDict({
                **{f"image_{i}": f.Image(shape=(256, 256, 3), encoding_format="jpeg") for i in range(4)},
                "state": f.Tensor(shape=(7,), dtype=np.float32)}),
            "reward": f.Scalar(dtype=np.float32)}),
    })


def _tensors(shapes: dict, dtype=np.float32) -> dict:
    return {k: f.Tensor(shape=s, dtype=dtype) for k, s in shapes.items()}


def fractal_features() -> f.FeaturesDict:
    attributes = {k: f.Tensor(shape=(), dtype=np.int64) for k in
                  ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")}
    attributes.update({f"{k}_name": f.Tensor(shape=(), dtype=STRING) for k in list(attributes)})
    return f.FeaturesDict({
        "aspects": f.FeaturesDict({k: f.Tensor(shape=(), dtype=np.bool_) for k in
                                   ("already_success", "feasible", "has_aspects", "success", "undesirable")}),
        "attributes": f.FeaturesDict(attributes),
        "steps": f.Dataset({
            "action": f.FeaturesDict({
                **_tensors({"base_displacement_vector": (2,), "base_displacement_vertical_rotation": (1,),
                            "gripper_closedness_action": (1,), "rotation_delta": (3,), "world_vector": (3,)}),
                "terminate_episode": f.Tensor(shape=(3,), dtype=np.int32)}),
            "is_first": f.Tensor(shape=(), dtype=np.bool_), "is_last": f.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": f.Tensor(shape=(), dtype=np.bool_),
            "observation": f.FeaturesDict({
                **_tensors({"base_pose_tool_reached": (7,), "gripper_closed": (1,),
                            "gripper_closedness_commanded": (1,), "height_to_bottom": (1,),
                            "natural_language_embedding": (512,), "orientation_box": (2, 3),
                            "orientation_start": (4,), "robot_orientation_positions_box": (3, 3),
                            "rotation_delta_to_go": (3,), "src_rotation": (4,), "vector_to_go": (3,),
                            "workspace_bounds": (3, 3)}),
                "image": f.Image(shape=(256, 320, 3), encoding_format="jpeg"),
                "natural_language_instruction": f.Tensor(shape=(), dtype=STRING)}),
            "reward": f.Scalar(dtype=np.float32)}),
    })


def droid_features() -> f.FeaturesDict:
    """DROID's step structure (TFDS droid / droid_100)."""
    image = f.Image(shape=(180, 320, 3), encoding_format="jpeg")
    return f.FeaturesDict({"steps": f.Dataset({
        "action": f.Tensor(shape=(7,), dtype=np.float64),
        "action_dict": f.FeaturesDict(_tensors({"cartesian_position": (6,), "cartesian_velocity": (6,),
                                                "gripper_position": (1,), "gripper_velocity": (1,),
                                                "joint_position": (7,), "joint_velocity": (7,)}, np.float64)),
        "language_instruction": f.Tensor(shape=(), dtype=STRING),
        "observation": f.FeaturesDict({
            **_tensors({"cartesian_position": (6,), "gripper_position": (1,), "joint_position": (7,)}, np.float64),
            "exterior_image_1_left": image, "exterior_image_2_left": image, "wrist_image_left": image}),
        "is_first": f.Tensor(shape=(), dtype=np.bool_)})})
