"""The Meta-World wrapper (``vtprune.metaworld``): deterministic per seed, what the policy sees, clear errors, and a
short closed loop of a tiny π0 policy, unpruned and pruned (``vla_pruner`` with per-row episode resets)."""

from __future__ import annotations

import numpy as np
import pytest

import vtprune
from vtprune import metaworld as mw
from vtprune.testing.pi0 import tiny_pi0

SIZE = 56


def _run(task: str, seed: int, actions: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    env = mw.MetaWorldTask(task, seed, size=SIZE)
    out = _play(env, env.reset(), actions)
    env.close()
    return out


def _play(env: mw.MetaWorldTask, obs: mw.Observation, actions: np.ndarray
          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    frames, states = [np.stack(obs.images)], [obs.state]
    for a in actions:
        obs, _ = env.step(a)
        frames.append(np.stack(obs.images))
        states.append(obs.state)
    return frames, states


@pytest.mark.parametrize("task", list(mw.TASKS))
def test_same_seed_same_episode_other_seed_other_layout(task):
    actions = np.random.default_rng(0).uniform(-1, 1, (4, mw.ACTION_DIM)).astype(np.float32)
    f1, s1 = _run(task, 7, actions)
    f2, s2 = _run(task, 7, actions)
    assert all(np.array_equal(a, b) for a, b in zip(f1, f2)) and all(np.array_equal(a, b) for a, b in zip(s1, s2))
    f3, _ = _run(task, 8, actions)
    assert not np.array_equal(f1[0], f3[0])  # the goal / object moved, and the cameras see it
    assert f1[0].shape == (len(mw.CAMERAS), SIZE, SIZE, 3) and f1[0].dtype == np.uint8
    assert s1[0].shape == (mw.STATE_DIM,) and s1[0].dtype == np.float32


@pytest.mark.parametrize("task", list(mw.TASKS))
def test_a_reseeded_instance_gives_the_episode_a_new_one_gives(task):
    """``rollout`` reuses a slot's environment for the next seed of the same task: frames and states after a reseed
    (and a different episode before it) equal a fresh instance's, bit for bit."""
    actions = np.random.default_rng(1).uniform(-1, 1, (4, mw.ACTION_DIM)).astype(np.float32)
    fresh_f, fresh_s = _run(task, 9, actions)
    env = mw.MetaWorldTask(task, 3, size=SIZE)
    env.reset()
    for a in actions[::-1]:
        env.step(a)
    frames, states = _play(env, env.reset(seed=9), actions)
    env.close()
    assert env.seed == 9
    assert all(np.array_equal(a, b) for a, b in zip(frames, fresh_f))
    assert all(np.array_equal(a, b) for a, b in zip(states, fresh_s))


def test_the_policy_sees_no_goal_or_object_coordinates():
    for task in mw.TASKS:
        env = mw.MetaWorldTask(task, 3, size=SIZE)
        obs = env.reset(render=False)
        full = env._obs  # the expert's view: hand, gripper, objects, ..., goal
        assert np.allclose(obs.state, full[:4]) and len(full) > 30 and obs.state.shape == (4,)
        assert np.allclose(full[36:39], env.env._target_pos) and np.abs(full[36:39]).sum() > 0, task
        env.close()


def test_the_scripted_expert_succeeds_on_held_out_seeds():
    """The reference controller (full state) solves each task through the wrapper: the wrapper's seeding and action
    clipping leave the tasks solvable."""
    for task in mw.TASKS:
        env = mw.MetaWorldTask(task, mw.HELD_OUT_SEED)
        env.reset(render=False)
        ok = False
        while not ok and env.steps < env.max_steps:
            _, ok = env.step(env.expert_action(), render=False)
        env.close()
        assert ok, task


def test_bad_task_and_camera_are_named():
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach'.*valid: button-press-topdown-v3"):
        mw.MetaWorldTask("reach", 0)
    with pytest.raises(ValueError, match=r"unknown camera\(s\) \['front'\].*valid: .*corner"):
        mw.MetaWorldTask("drawer-open-v3", 0, cameras=("corner", "front"))


def _policy():
    model, proc = tiny_pi0(image_size=SIZE, chunk=4, steps=2)
    proc.state_mean, proc.state_std = [0.0] * mw.STATE_DIM, [1.0] * mw.STATE_DIM
    proc.actions_mean, proc.actions_std = [0.0] * mw.ACTION_DIM, [1.0] * mw.ACTION_DIM
    return model, proc


def test_closed_loop_rollout_is_reproducible_and_pruning_runs_in_it():
    """Three episodes on two vectorised environments (a slot takes the next job when its episode ends): the same
    seeds give the same episodes; vla_pruner warms up per batch row, then keeps its budget per camera; a row that
    takes a new episode starts its warm-up again (``vtprune.reset(policy, rows=[i])``) while the other row prunes."""
    model, proc = _policy()
    jobs = [("drawer-open-v3", mw.HELD_OUT_SEED + i) for i in range(3)]
    kw = dict(envs=2, execute=2, size=SIZE, max_steps=8)
    a = mw.rollout(model, proc, jobs, **kw)
    b = mw.rollout(model, proc, jobs, **kw)
    assert [(e.seed, e.steps, e.success) for e in a] == [(e.seed, e.steps, e.success) for e in b]
    assert sorted(e.seed for e in a) == [s for _, s in jobs] and all(e.steps == 8 for e in a)
    assert all(len(e.step_ms) == 4 and e.kept == [None] * 4 for e in a)

    keep = 4
    vtprune.prune(model, method="vla_pruner", keep=keep, layer=1, window=2)
    eps = {e.seed: e for e in mw.rollout(model, proc, jobs, **kw)}
    full = list(range((SIZE // 14) ** 2))
    for seed in (mw.HELD_OUT_SEED, mw.HELD_OUT_SEED + 1):  # the first two episodes run side by side from step 0
        kept = eps[seed].kept
        assert kept[0] == kept[1] == [full, full]  # warm-up: nothing pruned
        assert all(len(cam) == keep for step in kept[2:] for cam in step)
    late = eps[mw.HELD_OUT_SEED + 2].kept  # started in a slot whose row had pruned: its history was reset
    assert late[0] == late[1] == [full, full] and all(len(cam) == keep for cam in late[2])
    vtprune.unprune(model)
    again = mw.rollout(model, proc, jobs, **kw)
    assert [(e.seed, e.steps) for e in again] == [(e.seed, e.steps) for e in a]


def test_rollout_executes_the_denormalised_chunk():
    """With the action statistics' std near 0 every predicted action is the statistics' mean: the frames the rollout
    saw at its control steps are those of the same environment driven by that action directly, ``execute`` steps
    per control step."""
    model, proc = _policy()
    act = [0.6, -0.4, 0.3, 1.0]
    proc.actions_mean, proc.actions_std = act, [1e-9] * mw.ACTION_DIM
    ep = mw.rollout(model, proc, [("drawer-open-v3", mw.HELD_OUT_SEED)], envs=1, execute=3, size=SIZE, max_steps=9,
                    keep_frames=True)[0]
    env = mw.MetaWorldTask("drawer-open-v3", mw.HELD_OUT_SEED, size=SIZE)
    frames = [env.reset().images]
    for _ in range(2):
        for _ in range(3):
            obs, _ = env.step(np.array(act))
        frames.append(obs.images)
    env.close()
    assert ep.steps == 9 and len(ep.frames) == 3
    for got, want in zip(ep.frames, frames):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))

