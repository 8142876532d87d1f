"""Meta-World v3 tasks as rendered robot environments (LeRobot protocol, fast rendering).

One `MetaWorldEnv` per task, built once and reset many times: building is the slow part, a reset
is milliseconds. The same wrapper serves data generation and closed-loop evaluation, so both see
identical cameras, image orientation and rendering settings.

Protocol (LeRobot's Meta-World setup): camera `corner2` moved to [0.75, 0.075, 0.7], corner images
flipped on both axes, state = hand xyz + gripper opening (obs[:4]), actions 4-d in [-1, 1],
native control rate 80 Hz (frame_skip 5 x 2.5 ms).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Container
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import metaworld  # noqa: E402,F401  (registers the Meta-World/* gymnasium ids)
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

CONTROL_HZ = 80.0
STATE_DIM = 4
ACTION_DIM = 4
CORNER2_POS = (0.75, 0.075, 0.7)
# Cameras that MuJoCo renders upside down and left-right mirrored for this scene.
FLIPPED_CAMERAS = ("corner", "corner2", "corner3", "corner4")

# Meta-World ships no language: one instruction and the name of the task's main object each.
TASKS: dict[str, tuple[str, str]] = {
    "assembly-v3": ("pick up the nut and put it on the peg", "nut"),
    "basketball-v3": ("put the ball into the basket", "ball"),
    "bin-picking-v3": ("move the puck from one bin to the other", "puck"),
    "box-close-v3": ("put the lid on the box", "lid"),
    "button-press-topdown-v3": ("press the button from the top", "button"),
    "button-press-topdown-wall-v3": ("press the button from the top behind the wall", "button"),
    "button-press-v3": ("press the button", "button"),
    "button-press-wall-v3": ("press the button behind the wall", "button"),
    "coffee-button-v3": ("press the button on the coffee machine", "coffee machine button"),
    "coffee-pull-v3": ("pull the mug away from the coffee machine", "mug"),
    "coffee-push-v3": ("push the mug under the coffee machine", "mug"),
    "dial-turn-v3": ("turn the dial", "dial"),
    "disassemble-v3": ("pick the nut off the peg", "nut"),
    "door-close-v3": ("close the door", "door"),
    "door-lock-v3": ("lock the door by turning the lock", "lock"),
    "door-open-v3": ("open the door", "door"),
    "door-unlock-v3": ("unlock the door by turning the lock", "lock"),
    "hand-insert-v3": ("put the gripper into the hole", "hole"),
    "drawer-close-v3": ("close the drawer", "drawer"),
    "drawer-open-v3": ("open the drawer", "drawer"),
    "faucet-open-v3": ("turn the faucet on", "faucet handle"),
    "faucet-close-v3": ("turn the faucet off", "faucet handle"),
    "hammer-v3": ("hammer the nail into the wall", "hammer"),
    "handle-press-side-v3": ("press the handle down from the side", "handle"),
    "handle-press-v3": ("press the handle down", "handle"),
    "handle-pull-side-v3": ("pull the handle up from the side", "handle"),
    "handle-pull-v3": ("pull the handle up", "handle"),
    "lever-pull-v3": ("pull the lever up", "lever"),
    "pick-place-wall-v3": ("pick up the puck and place it at the goal behind the wall", "puck"),
    "pick-out-of-hole-v3": ("pick the puck out of the hole", "puck"),
    "pick-place-v3": ("pick up the puck and place it at the goal", "puck"),
    "plate-slide-v3": ("slide the plate into the goal", "plate"),
    "plate-slide-side-v3": ("slide the plate sideways into the goal", "plate"),
    "plate-slide-back-v3": ("slide the plate back out of the goal", "plate"),
    "plate-slide-back-side-v3": ("slide the plate sideways back out of the goal", "plate"),
    "peg-insert-side-v3": ("insert the peg into the hole from the side", "peg"),
    "peg-unplug-side-v3": ("unplug the peg from the hole", "peg"),
    "soccer-v3": ("kick the ball into the goal", "ball"),
    "stick-push-v3": ("grasp the stick and push the box with it", "stick"),
    "stick-pull-v3": ("grasp the stick and pull the box with it", "stick"),
    "push-v3": ("push the puck to the goal", "puck"),
    "push-wall-v3": ("push the puck around the wall to the goal", "puck"),
    "push-back-v3": ("push the puck back to the goal", "puck"),
    "reach-v3": ("reach the goal with the gripper", "goal"),
    "reach-wall-v3": ("reach over the wall to the goal", "goal"),
    "shelf-place-v3": ("place the block on the shelf", "block"),
    "sweep-into-v3": ("sweep the puck into the hole", "puck"),
    "sweep-v3": ("sweep the puck off the table", "puck"),
    "window-open-v3": ("slide the window open", "window"),
    "window-close-v3": ("slide the window closed", "window"),
}

_HUES = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (255, "blue"),
         (330, "purple"), (360, "red"))
_NEAR = 0.05  # m: gripper this close to the object counts as "at the object"
_DEFAULT_GEOM_RGBA = (0.5, 0.5, 0.5, 1.0)
_STATIC_BODIES = ("world", "tablelink", "RetainingWall", "mocap")


def instruction(task: str) -> str:
    return TASKS[task][0]


def color_name(rgb: np.ndarray) -> str:
    """Name of an RGB color in [0, 1]: gray levels by value when unsaturated, else by hue."""
    r, g, b = (float(x) for x in rgb[:3])
    hi, lo = max(r, g, b), min(r, g, b)
    if hi < 0.2:
        return "black"
    if (hi - lo) / hi < 0.25:
        return "white" if hi > 0.85 else "gray"
    if hi == r:
        hue = (60 * (g - b) / (hi - lo)) % 360
    elif hi == g:
        hue = 60 * (b - r) / (hi - lo) + 120
    else:
        hue = 60 * (r - g) / (hi - lo) + 240
    return next(name for limit, name in _HUES if hue < limit)


# {"images": {camera: uint8 [H, W, 3]}, "state": f32 [4] (hand xyz, gripper opening in [0, 1])}
Observation = dict[str, Any]


@dataclasses.dataclass
class SceneObject:
    """Ground truth for one object: world position and the visible parts that make it up."""
    label: str
    color: str
    position: np.ndarray  # f64 [3], world frame
    parts: tuple[tuple[str, int], ...]  # ("geom" | "site", MuJoCo id)


class MetaWorldEnv:
    """One Meta-World v3 task, rendered from `cameras` at `image_size`² with fast settings.

    reset(seed) -> Observation; step(action [4]) -> (Observation, reward, success, truncated).
    The scene is a deterministic function of the seed (object and goal positions are drawn
    from the task's own reset space with a generator seeded per episode).
    """

    def __init__(self, task: str, cameras: tuple[str, ...] = ("corner2",),
                 image_size: int = 64, max_episode_steps: int = 500):
        if task not in TASKS:
            raise ValueError(f"unknown Meta-World v3 task {task!r}; known: {sorted(TASKS)}")
        self.task = task
        self.instruction = instruction(task)
        self.object_label = TASKS[task][1]
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.max_episode_steps = max_episode_steps
        self.control_hz = CONTROL_HZ
        self._env = gym.make(
            "Meta-World/MT1", env_name=task, render_mode="rgb_array", camera_name=self.cameras[0],
            width=image_size, height=image_size, max_episode_steps=max_episode_steps,
            disable_env_checker=True)
        self._mw = self._env.unwrapped
        model = self._mw.model
        self._cam_ids = {c: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, c)
                         for c in self.cameras}
        missing = [c for c, i in self._cam_ids.items() if i < 0]
        if missing:
            raise ValueError(f"cameras {missing} not in the Meta-World scene")
        model.cam_pos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner2")] = CORNER2_POS
        # Shadows (a 4096² map), reflections and MSAA dominate render time; they must be off
        # before the first render creates the GL context, and stay off for evaluation too.
        model.vis.quality.offsamples = 0
        renderer = self._mw.mujoco_renderer
        viewer = renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # We draw the scene from our own seeded generator instead of MT1's 50 fixed goals; one
        # set_task is still needed to configure the task (observability, task kwargs).
        self._env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
        self._mw.set_task(self._env.get_wrapper_attr("tasks")[0])
        self._policy = ENV_POLICY_MAP[task]()
        self._raw_obs: np.ndarray | None = None
        self._object: tuple[tuple[int, ...], str] | None = None  # (geoms, color), fixed per task

    # ------------------------------------------------------------------ control
    def reset(self, seed: int) -> Observation:
        mw = self._mw
        mw._freeze_rand_vec = False
        mw.seeded_rand_vec = True
        mw.np_random = np.random.default_rng(seed)
        self._raw_obs, _ = self._env.reset()
        return self.observation()

    def step(self, action: np.ndarray, render: bool = True
             ) -> tuple[Observation, float, bool, bool]:
        """action: f32 [4] in [-1, 1] (clipped). Returns (obs, reward, success, truncated);
        render=False skips the cameras (obs["images"] is empty), for steps nobody looks at."""
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._raw_obs, reward, _, truncated, info = self._env.step(action)
        return self.observation(render), float(reward), bool(info["success"]), bool(truncated)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state: f32 [4] in [-1, 1]."""
        return np.clip(self._policy.get_action(self._raw_obs), -1.0, 1.0).astype(np.float32)

    def observation(self, render: bool = True) -> Observation:
        return {"images": {c: self.render(c) for c in self.cameras} if render else {},
                "state": self._raw_obs[:STATE_DIM].astype(np.float32)}

    def render(self, camera: str) -> np.ndarray:
        """uint8 [H, W, 3], upright (corner cameras flipped on both axes)."""
        renderer = self._mw.mujoco_renderer
        renderer.camera_id = self._cam_ids[camera]
        # Each env owns a GL context and gymnasium only switches contexts between the viewers
        # of one env: with several envs in a process, make ours current or render another's.
        renderer._get_viewer("rgb_array").make_context_current()
        image = renderer.render("rgb_array")
        if camera in FLIPPED_CAMERAS:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def close(self) -> None:
        self._env.close()

    # ------------------------------------------------------------------ ground truth
    def subtask(self, succeeded: bool) -> str:
        """The phase the task is in, from ground truth: reaching the object, doing the task,
        or done. Reach tasks have a single phase before done."""
        if succeeded:
            return "done"
        if self.task.startswith("reach"):
            return "move the gripper to the goal"
        obj = self.main_object()
        if np.linalg.norm(self.gripper_position() - obj.position) > _NEAR:
            return f"reach the {obj.label}"
        return self.instruction

    def gripper_position(self) -> np.ndarray:
        """f64 [3]: the tool centre point between the fingers, world frame."""
        return np.array(self._mw.tcp_center)

    def gripper_opening(self) -> float:
        return float(self._raw_obs[3])

    def main_object(self) -> SceneObject:
        """The task's main object: the first object in Meta-World's observation, or for reach
        tasks the goal marker (their puck is a flat disk the expert ignores)."""
        model, data = self._mw.model, self._mw.data
        if self.task.startswith("reach"):
            site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
            return SceneObject(self.object_label, color_name(model.site_rgba[site]),
                               np.array(data.site_xpos[site]), (("site", site),))
        position = np.array(self._mw._get_pos_objects()[:3])
        if self._object is None:
            self._object = self._object_near(position)
        geoms, color = self._object
        return SceneObject(self.object_label, color, position, tuple(("geom", g) for g in geoms))

    def articulation(self) -> float | None:
        """How far the main object's hinge/slide joint is from its rest position, in [0, 1] of
        its range (drawer/door/window openness, button travel); None for free objects."""
        model, data = self._mw.model, self._mw.data
        for kind, i in self.main_object().parts:
            body = model.geom_bodyid[i] if kind == "geom" else model.site_bodyid[i]
            first_joint = model.body_jntadr[body]
            for j in range(first_joint, first_joint + model.body_jntnum[body]):
                if model.jnt_type[j] in (mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE):
                    lo, hi = model.jnt_range[j]
                    q = data.qpos[model.jnt_qposadr[j]] - model.qpos0[model.jnt_qposadr[j]]
                    return float(np.clip(abs(q) / (hi - lo if hi > lo else 1.0), 0, 1))
        return None

    def project(self, points: np.ndarray, camera: str) -> np.ndarray:
        """World points f64 [N, 3] -> pixel coordinates f64 [N, 2] as (row, col) in the image
        `render(camera)` returns (continuous; pixel k covers [k, k+1)). Pinhole model from
        MuJoCo's camera pose (cam_xpos/cam_xmat) and vertical field of view."""
        model, data = self._mw.model, self._mw.data
        cam = self._cam_ids[camera]
        rot = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (back)
        local = (np.asarray(points, np.float64) - data.cam_xpos[cam]) @ rot
        depth = -local[:, 2]
        h = w = self.image_size
        focal = 0.5 * h / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
        col = w / 2 + focal * local[:, 0] / depth
        row = h / 2 - focal * local[:, 1] / depth
        if camera in FLIPPED_CAMERAS:
            row, col = h - row, w - col
        return np.stack([row, col], axis=-1)

    def object_box(self, obj: SceneObject, camera: str) -> np.ndarray | None:
        """Image box f64 [4] (ymin, xmin, ymax, xmax) in pixels of the object's visible parts,
        from their projected bounding-box corners, clipped to the image; None if off-image."""
        model, data = self._mw.model, self._mw.data
        corners = []
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)
        for kind, i in obj.parts:
            if kind == "geom":
                center, half = model.geom_aabb[i, :3], model.geom_aabb[i, 3:]
                pos, rot = data.geom_xpos[i], data.geom_xmat[i]
            else:  # sites used as markers are spheres: radius = size[0]
                center, half = np.zeros(3), np.full(3, model.site_size[i, 0])
                pos, rot = data.site_xpos[i], data.site_xmat[i]
            corners.append(pos + (center + signs * half) @ rot.reshape(3, 3).T)
        pix = self.project(np.concatenate(corners), camera)
        size = self.image_size
        ymin, xmin = np.clip(pix.min(0), 0, size)
        ymax, xmax = np.clip(pix.max(0), 0, size)
        if ymax - ymin < 1 or xmax - xmin < 1:
            return None
        return np.array([ymin, xmin, ymax, xmax])

    def _object_near(self, position: np.ndarray) -> tuple[tuple[int, ...], str]:
        """The object with the visible geom nearest `position`: all visible geoms of its
        top-level body with every link (the whole drawer, door or button box), and its color:
        that of the largest geom of the moving part itself (drawer front, button cap)."""
        model, data = self._mw.model, self._mw.data
        robot_root = model.body_rootid[model.body("rightclaw").id]
        static = {mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, n) for n in _STATIC_BODIES}
        visible = [g for g in range(model.ngeom)
                   if model.geom_group[g] <= 2 and self._geom_rgba(g)[3] > 0
                   and model.body_rootid[model.geom_bodyid[g]] != robot_root
                   and model.geom_bodyid[g] not in static]
        nearest = min(visible, key=lambda g: np.linalg.norm(data.geom_xpos[g] - position))
        body = model.geom_bodyid[nearest]
        part = [g for g in visible if model.geom_bodyid[g] == body]
        largest = max(part, key=lambda g: np.prod(model.geom_aabb[g, 3:]))
        whole = tuple(g for g in visible
                      if model.body_rootid[model.geom_bodyid[g]] == model.body_rootid[body])
        return whole, color_name(self._geom_rgba(largest))

    def _geom_rgba(self, geom: int) -> np.ndarray:
        model = self._mw.model
        rgba = model.geom_rgba[geom]
        # MuJoCo uses the material's color unless the geom overrides the default gray.
        if model.geom_matid[geom] >= 0 and np.allclose(rgba, _DEFAULT_GEOM_RGBA):
            return model.mat_rgba[model.geom_matid[geom]]
        return rgba


@dataclasses.dataclass
class Rollout:
    """One played episode. N steps: observation t, then the action taken at t."""
    frames: dict[int, dict[str, np.ndarray]]  # step -> camera -> uint8 [H, W, 3] (rendered steps)
    state: np.ndarray  # f32 [N, 4]
    actions: np.ndarray  # f32 [N, 4]
    rewards: np.ndarray  # f32 [N]: reward after the action at t
    succeeded: np.ndarray  # bool [N]: success reached at or before observation t
    subtasks: list[str]  # [N] ground-truth phase at observation t
    success: bool  # success reached within the episode


Policy = Callable[[MetaWorldEnv], np.ndarray]


def expert(env: MetaWorldEnv) -> np.ndarray:
    return env.expert_action()


def run_episode(env: MetaWorldEnv, seed: int, policy: Policy = expert, max_steps: int = 500,
                steps_after_success: int | None = 10, render_steps: Container[int] | None = None,
                on_step: Callable[[int, Observation], None] | None = None) -> Rollout:
    """Resets to `seed` and plays `policy` until `steps_after_success` steps after the first
    success (None: never stop early) or `max_steps`. Renders every step, or only
    `render_steps`. `on_step(t, obs)` sees the live env at observation t (for ground truth)."""
    def wanted(t: int) -> bool:
        return render_steps is None or t in render_steps

    obs = env.reset(seed)
    if not wanted(0):
        obs["images"] = {}
    frames, states, actions, rewards, succeeded, subtasks = {}, [], [], [], [], []
    done, first_success = False, None
    for t in range(max_steps):
        if obs["images"]:
            frames[t] = obs["images"]
        states.append(obs["state"])
        succeeded.append(done)
        subtasks.append(env.subtask(done))
        if on_step is not None:
            on_step(t, obs)
        action = policy(env)
        actions.append(np.asarray(action, np.float32))
        obs, reward, success, truncated = env.step(action, render=wanted(t + 1))
        rewards.append(reward)
        if success and not done:
            done, first_success = True, t
        if truncated or (done and steps_after_success is not None
                         and t - first_success >= steps_after_success):
            break
    return Rollout(frames, np.stack(states), np.clip(np.stack(actions), -1, 1),
                   np.asarray(rewards, np.float32), np.asarray(succeeded), subtasks, done)
