"""The step hook and the between-task hand-over, with the weight ensemble and EMA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax.merging
from cljax.averaging import (
    average_params,
    averaging_hook,
    averaging_next_task,
    ema,
    init_averages,
    interpolate,
    swa,
    weight_ensemble,
)
from cljax.train import TrainState, make_step


def _loss(p, batch, rng):
    return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


@pytest.mark.slow
def test_averages_in_a_jitted_donated_step_follow_the_trajectory(rng):
    params = {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    avgs = {"we": weight_ensemble(every=3), "ema": ema(decay=0.8)}
    state = TrainState.create(params, optax.sgd(0.1), key=0, methods=init_averages(avgs, params))
    step = make_step(_loss, post_update=averaging_hook(avgs))  # jitted and donated
    snapshots = [np.asarray(params["w"], np.float64)]
    ema_ref = np.asarray(params["w"], np.float64)
    for i in range(10):
        batch = {"x": rng.normal(size=(8, 4)), "y": rng.normal(size=(8, 2))}
        state, _ = step(state, batch)
        w = np.asarray(state.params["w"], np.float64)
        ema_ref = 0.8 * ema_ref + 0.2 * w
        if i % 3 == 0:
            snapshots.append(w)
    assert len(snapshots) == 5  # start, iterations 0, 3, 6, 9
    np.testing.assert_allclose(
        state.methods["we"].mean["w"], np.mean(snapshots, 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(state.methods["ema"].mean["w"], ema_ref, rtol=1e-5, atol=1e-6)


def test_skipped_step_leaves_the_ensemble_unchanged(rng):
    params = {"w": jnp.ones((4, 2))}
    avgs = {"we": weight_ensemble(every=1)}
    state = TrainState.create(params, optax.sgd(0.1), methods=init_averages(avgs, params))
    step = make_step(_loss, post_update=averaging_hook(avgs), nonfinite="skip", donate=False)
    bad = {"x": np.full((2, 4), np.nan), "y": np.zeros((2, 2))}
    new, _ = step(state, bad)
    chex.assert_trees_all_equal(new.methods, state.methods)


@pytest.mark.slow
def test_next_task_starts_from_the_ensemble(rng):
    params = {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)}
    we = weight_ensemble(every=1)
    tx = optax.adam(1e-2)
    state = TrainState.create(params, tx, methods={"we": we.init(params)})
    step = make_step(_loss, post_update=averaging_hook({"we": we}))
    for _ in range(3):
        state, _ = step(state, {"x": rng.normal(size=(8, 4)), "y": rng.normal(size=(8, 2))})
    mean = state.methods["we"].mean
    new = averaging_next_task(state, we, name="we")
    assert new.params["w"].dtype == jnp.bfloat16
    chex.assert_trees_all_equal(new.params, average_params(state.methods["we"], state.params))
    np.testing.assert_allclose(
        np.asarray(new.params["w"], np.float32), mean["w"], rtol=1e-2
    )  # bfloat16 storage
    assert int(new.methods["we"].count) == 1 and int(new.methods["we"].iteration) == 0
    chex.assert_trees_all_equal(
        new.methods["we"].mean, jax.tree.map(lambda x: x.astype(jnp.float32), new.params)
    )
    chex.assert_trees_all_equal(new.opt_state, tx.init(new.params))
    assert int(new.step) == 3
    # Committed like a step's outputs (the fresh optimiser count too): no recompile next step.
    assert all(x.committed for x in jax.tree.leaves(new) if isinstance(x, jax.Array))


def test_hook_names_a_missing_state():
    params = {"w": jnp.ones(2)}
    state = TrainState.create(params, optax.sgd(0.1))
    hook = averaging_hook({"we": weight_ensemble(every=1)})
    with pytest.raises(ValueError, match="state.methods has no 'we'"):
        hook(state)


def test_wise_ft_is_the_merging_interpolation():
    # ZSCL's MTIL WiSE-FT baseline: alpha = 0.8 on the fine-tuned end, the start-of-task
    # model on the other.
    assert interpolate is cljax.merging.interpolate
    start, ft = {"w": jnp.asarray([0.0, 10.0])}, {"w": jnp.asarray([5.0, 0.0])}
    np.testing.assert_allclose(interpolate(start, ft, 0.8)["w"], [4.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "averager",
    [ema(decay=0.9, debias=True), weight_ensemble(every=1), swa(start=0)],
    ids=["ema", "we", "swa"],
)
def test_averages_on_an_8_device_mesh_match_unsharded(rng, averager):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    p0 = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)}
    p1 = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)}
    update = jax.jit(averager.update)
    _, want = update(p1, averager.init(p0), step=1)
    sharded = jax.device_put(p0, spec), jax.device_put(p1, spec)
    _, got = update(sharded[1], averager.init(sharded[0]), step=1)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    assert got.mean["w"].dtype == jnp.float32
    assert got.mean["w"].sharding.is_equivalent_to(spec, 2)
