"""Meta-World v3 tasks as a robot policy sees them: camera images and proprioception, deterministic per seed.

The policy gets the cameras' RGB frames and the robot's own state (hand position, gripper opening) only — not the
object and goal coordinates that Meta-World's state vector also holds — so it has to *see* where to go. The scripted
expert (``metaworld.policies``) reads the full state; it makes the demonstrations and is the reference controller.

Needs the ``robot`` extra (``metaworld==3.1.1``, ``mujoco==3.3.0``) and an offscreen GL context: ``MUJOCO_GL=egl``
(Mesa, software) works on CPU machines and is the default set here; a machine without one gets a clear error.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

#: task -> the instruction the policy reads. Each task's object position is drawn per seed and is visible. (reach-v3
#: was dropped: its goal is a 1-2 pixel dot at 112 px and the first trained policy solved 25 % of its episodes)
TASKS = {
    "button-press-topdown-v3": "press the button down",
    "drawer-open-v3": "open the drawer",
    "handle-press-v3": "press the handle down",
}
#: the cameras the shipped policy sees (Meta-World's fixed scene cameras)
CAMERAS = ("corner", "topview")
#: proprioception the policy sees: hand x, y, z and the gripper opening (Meta-World's obs[0:4])
STATE_DIM = 4
ACTION_DIM = 4
#: actions of each predicted chunk executed before the next policy call (re-planning often matters in closed loop:
#: the first policy solved 55 % of drawer-open episodes executing 4 of 8 actions, 100 % executing 1)
EXECUTE = 2
#: held-out seeds start here; training demonstrations use seeds below it
HELD_OUT_SEED = 100_000


def _import() -> Any:
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Mesa's software EGL and triton each bring an LLVM: triton's library loaded after Mesa's crashes the process
    # (a segfault on the first `import transformers...` that pulls triton in), the other order works
    try:
        import triton.runtime  # noqa: F401
    except ImportError:
        pass
    try:
        import metaworld
        import metaworld.policies
    except ImportError as e:
        raise ImportError(f"Meta-World is not installed ({e}); install the robot extra: pip install -c "
                          "constraints.txt 'vtprune[robot]' (metaworld==3.1.1, mujoco==3.3.0)") from e
    return metaworld


@dataclass
class Observation:
    """What the policy sees at one step: ``images`` one uint8 [H, W, 3] frame per camera, ``state`` [STATE_DIM]."""

    images: list[np.ndarray]
    state: np.ndarray


class MetaWorldTask:
    """One Meta-World v3 task instance: the layout (goal / object positions) is drawn from ``seed`` alone, so the same
    seed gives the same episode for the same actions.

    ``step(action)`` clips ``action`` [4] to [-1, 1] and returns ``(observation, success)``; ``render`` is skipped
    with ``render=False`` (steps between policy calls need no pictures). Episodes end at success or ``max_steps``.
    """

    def __init__(self, task: str, seed: int, size: int = 112, cameras: tuple[str, ...] = CAMERAS,
                 max_steps: int = 200):
        if task not in TASKS:
            raise ValueError(f"unknown Meta-World task {task!r}; valid: {', '.join(TASKS)}")
        mw = _import()
        cls = mw.env_dict.ALL_V3_ENVIRONMENTS[task]
        self.task, self.seed, self.size, self.cameras, self.max_steps = task, seed, size, tuple(cameras), max_steps
        self.env = cls(render_mode="rgb_array", width=size, height=size, camera_name=self.cameras[0])
        bad = [c for c in self.cameras if self._camera_id(c) < 0]
        if bad:
            import mujoco

            names = [mujoco.mj_id2name(self.env.model, mujoco.mjtObj.mjOBJ_CAMERA, i)
                     for i in range(self.env.model.ncam)]
            raise ValueError(f"unknown camera(s) {bad} for {task}; valid: {', '.join(names)}")
        # full observation for the expert; a layout drawn from this instance's own generator, seeded by `seed`
        self.env._partially_observable = False
        try:  # the cached observation space clips the goal to 0 while partially observable: recompute it
            del self.env.sawyer_observation_space
        except AttributeError:
            pass
        self.env._set_task_called = True
        self.env._freeze_rand_vec = False
        self.env.seeded_rand_vec = True
        self.env.seed(seed)
        self.expert = mw.policies.ENV_POLICY_MAP[task]()
        self.instruction = TASKS[task]
        self.steps = 0
        self._obs: np.ndarray | None = None

    def _camera_id(self, name: str) -> int:
        import mujoco

        return mujoco.mj_name2id(self.env.model, mujoco.mjtObj.mjOBJ_CAMERA, name)

    def reset(self, render: bool = True, seed: int | None = None) -> Observation:
        """Start an episode at this instance's seed, or at ``seed`` (it becomes the instance's): a reused instance
        gives exactly the episode a new one would (checked by the tests), without a new GL context (~0.7 s)."""
        if seed is not None:
            self.seed = seed
        self.env.seed(self.seed)  # the same layout at every reset of this instance
        self._obs, _ = self.env.reset()
        self.steps = 0
        return self.observe(render)

    def observe(self, render: bool = True) -> Observation:
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return Observation(self.render() if render else [], self._obs[:STATE_DIM].astype(np.float32))

    def render(self) -> list[np.ndarray]:
        import mujoco

        r = self.env.mujoco_renderer
        # shadows and the table's reflection are extra render passes: 4-5x the time of a frame on Mesa's software
        # renderer, and the policy does not need them
        viewer = r._get_viewer("rgb_array")
        # gymnasium makes a viewer's GL context current only when it is created: with several environments, a render
        # would otherwise draw this scene with the newest environment's context (its meshes and textures)
        viewer.make_context_current()
        flags = viewer.scn.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        frames = []
        for cam in self.cameras:
            r.camera_id = self._camera_id(cam)
            try:
                frame = r.render("rgb_array")
            except Exception as e:  # noqa: BLE001 - the GL backends fail with many types; say what to do
                raise RuntimeError(f"Meta-World could not render ({type(e).__name__}: {e}); offscreen rendering "
                                   f"needs a GL context: MUJOCO_GL=egl (now {os.environ.get('MUJOCO_GL')!r})") from e
            frames.append(np.ascontiguousarray(frame[::-1, ::-1]))  # MuJoCo's frames come upside down
        return frames

    def expert_action(self) -> np.ndarray:
        return np.clip(self.expert.get_action(self._obs), -1, 1).astype(np.float32)

    def step(self, action: np.ndarray, render: bool = True) -> tuple[Observation, bool]:
        self._obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, dtype=np.float32), -1, 1))
        self.steps += 1
        return self.observe(render), bool(info["success"])

    def close(self) -> None:
        self.env.close()


@dataclass
class Episode:
    """One finished episode: ``success``, env steps taken, and per control step its latency (ms) and, when the
    policy is pruned, what the report kept (``kept``: per camera the kept token indices; ``None`` unpruned)."""

    task: str
    seed: int
    success: bool
    steps: int
    step_ms: list[float]
    kept: list[list[list[int]] | None]
    frames: list[list[np.ndarray]]


def prompt_padding(processor: Any, cameras: int) -> dict[str, Any]:
    """Processor keywords that pad every prompt to the longest task's (right padding, as the policy was trained)."""
    tok = processor.tokenizer
    text = max(len(tok(f"{tok.bos_token}{t}\n")["input_ids"]) for t in TASKS.values())
    n = processor.image_seq_length * cameras + text
    return {"padding": "max_length", "max_length": n}


def rollout(policy: Any, processor: Any, jobs: list[tuple[str, int]], envs: int = 8, execute: int = EXECUTE,
            size: int = 112, cameras: tuple[str, ...] = CAMERAS, max_steps: int = 200, noise_seed: int = 0,
            keep_frames: bool = False, blank: bool = False) -> list[Episode]:
    """Run ``policy`` (a π0 ``PI0ForConditionalGeneration`` with ``processor``) closed loop on every ``(task, seed)``
    of ``jobs``, ``envs`` environments at a time as one batch (vectorised evaluation).

    Every control step renders each environment's cameras, calls ``policy.sample_actions`` once for the batch and
    executes the first ``execute`` actions of each chunk. A slot whose episode ends takes the next job, and a pruned
    policy's episode state for that batch row is reset (``vtprune.reset(policy, rows=[i])``) — the other rows keep
    theirs. When the jobs run out, finished slots keep stepping (results ignored) so the batch rows stay aligned.
    Each episode's start noise at each control step is drawn from ``noise_seed``, its task, seed and step, and every
    prompt is padded to the longest task's (as in training): an episode's outcome does not depend on the batch.
    ``blank``: the policy gets black frames instead of the cameras' (the check that it needs to see).
    """
    import torch

    import vtprune

    queue = list(jobs)
    slots: list[dict[str, Any] | None] = []
    pruned = vtprune.is_pruned(policy)

    def start(i: int) -> dict[str, Any] | None:
        if not queue:
            return None
        task, seed = queue.pop(0)
        old = slots[i]["env"] if i < len(slots) and slots[i] is not None else None
        if old is not None and old.task == task:  # same task: reseed the slot's environment
            env = old
        else:
            if old is not None:
                old.close()
            env = MetaWorldTask(task, seed, size=size, cameras=cameras, max_steps=max_steps)
        obs = env.reset(render=False, seed=seed)
        if pruned and i < len(slots):
            vtprune.reset(policy, rows=[i])
        return dict(env=env, obs=obs, ep=Episode(task, seed, False, 0, [], [], []), done=False)

    for i in range(min(envs, len(queue))):
        slots.append(start(i))
    finished: list[Episode] = []
    mean = torch.tensor(processor.actions_mean)
    std = torch.tensor(processor.actions_std)
    while any(s is not None and not s["done"] for s in slots):
        if blank and not keep_frames:  # black frames need no rendering (the slow part of a control step)
            frames = [[np.zeros((size, size, 3), np.uint8) for _ in cameras] for _ in slots]
        else:
            frames = [s["env"].render() for s in slots]
        seen = [[np.zeros_like(f) for f in fr] for fr in frames] if blank else frames
        inputs = processor(images=seen, text=[s["env"].instruction for s in slots],
                           state=np.stack([s["obs"].state for s in slots]), **prompt_padding(processor, len(cameras)),
                           return_tensors="pt")
        # each episode's own noise per control step: an episode's outcome does not depend on its batch neighbours
        noise = torch.stack([torch.randn(policy.config.chunk_size, policy.config.max_action_dim,
                                         generator=torch.Generator().manual_seed(
                                             zlib.crc32(f"{noise_seed} {s['env'].task} {s['env'].seed} "
                                                        f"{len(s['ep'].step_ms)}".encode()))) for s in slots])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = policy.sample_actions(**inputs, noise=noise)
        ms = (time.perf_counter() - t0) * 1e3
        rep = vtprune.last_report(policy) if pruned else None
        kept = ([[im.kept.tolist() for im in rep.images if im.sample == i] for i in range(len(slots))]
                if rep is not None else [None] * len(slots))
        actions = (out[..., :ACTION_DIM] * (std + 1e-8) + mean).numpy()
        for i, s in enumerate(slots):
            if s is None or s["done"]:
                continue
            ep, env = s["ep"], s["env"]
            ep.step_ms.append(ms)
            ep.kept.append(kept[i])
            if keep_frames:
                ep.frames.append(frames[i])
            for a in actions[i, :execute]:
                s["obs"], ok = env.step(a, render=False)
                ep.steps += 1
                if ok or ep.steps >= max_steps:
                    ep.success = ok
                    break
            if ep.success or ep.steps >= max_steps:
                finished.append(ep)
                nxt = start(i)
                if nxt is None:
                    s["done"] = True  # stays in the batch (its last frame), its results ignored
                else:
                    slots[i] = nxt
    for s in slots:
        if s is not None:
            s["env"].close()
    return finished


def evaluate(policy: Any, processor: Any, seeds: dict[str, list[int]], **kwargs: Any) -> dict[str, float]:
    """Success rate per task over the given seeds (closed loop, :func:`rollout`)."""
    eps = rollout(policy, processor, [(t, s) for t, ss in seeds.items() for s in ss], **kwargs)
    return {t: float(np.mean([e.success for e in eps if e.task == t])) for t in seeds}


def step_latency(policy: Any, processor: Any, configs: dict[str, dict[str, Any] | None], envs: int = 8,
                 repeats: int = 7) -> dict[str, Any]:
    """Latency of one control step (``sample_actions`` on the first observations of ``envs`` held-out episodes,
    tasks in turn, fixed noise) for every entry of ``configs`` (``None``: unpruned; otherwise ``vtprune.prune``
    keywords), all interleaved (``vtprune._timing``). Episode methods run on a weight-sharing copy kept pruned and
    stepped past their warm-up, so their timed steps prune. Returns per name: median / p10 / p90 ms, runs, and the
    speed-up over the first entry."""
    import copy
    import functools

    import torch

    import vtprune
    from vtprune import _timing

    obs, tasks = [], list(TASKS)
    for i in range(envs):
        env = MetaWorldTask(tasks[i % len(tasks)], HELD_OUT_SEED + i)
        obs.append((env.instruction, env.reset()))
        env.close()
    inputs = processor(images=[o.images for _, o in obs], text=[t for t, _ in obs],
                       state=np.stack([o.state for _, o in obs]), **prompt_padding(processor, len(CAMERAS)),
                       return_tensors="pt")
    noise = torch.randn(envs, policy.config.chunk_size, policy.config.max_action_dim,
                        generator=torch.Generator().manual_seed(0))

    def step(m: Any) -> Any:
        with torch.no_grad():
            return m.sample_actions(**inputs, noise=noise)

    cases: dict[str, Any] = {}
    for name, cfg in configs.items():
        if cfg is None:
            cases[name] = _timing.Case(functools.partial(step, policy))
        elif "action_attention" in vtprune.registry.get_selector(cfg["method"]).requires:  # an episode method
            m = copy.deepcopy(policy, memo={id(w): w for w in policy.parameters()})
            vtprune.prune(m, **cfg)
            for _ in range(8):  # past the warm-up window
                step(m)
            cases[name] = _timing.Case(functools.partial(step, m))
        else:
            cases[name] = _timing.Case(functools.partial(step, policy),
                                       functools.partial(_timing.pruned, policy, **cfg))
    st = _timing.measure(cases, repeats=repeats, warmup=1)
    base = next(iter(st.values()))
    return {k: dict(**v.to_dict(), speedup=_timing.ratio(base, v).to_dict()) for k, v in st.items()}
