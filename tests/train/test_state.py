"""TrainState.create owns its arrays: a donating step never deletes the caller's."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from cljax.train import TrainState, make_step


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


def _batch(rng):
    return {
        "x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
    }


def _reference_adam(loss, params, batches, lr):
    """Two Adam updates by hand, with no TrainState, jit or donation."""
    tx = optax.adam(lr)
    opt = tx.init(params)
    for b in batches:
        g = jax.grad(loss)(params, b, None)
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)
    return params


def _snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_alive_and_equal(tree, snapshot):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(snapshot), strict=True):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), s)


@pytest.mark.slow
def test_linen_pretrained_params_survive_two_donated_steps(rng):
    model = _MLP()
    batches = [_batch(rng), _batch(rng)]
    theta0 = model.init(jax.random.key(0), batches[0]["x"])["params"]
    before = _snapshot(theta0)

    def loss(p, b, r):
        del r
        return jnp.mean((model.apply({"params": p}, b["x"]) - b["y"]) ** 2)

    step = make_step(loss)  # jitted, donating
    state = TrainState.create(theta0, optax.adam(1e-2), key=0)
    for b in batches:
        state, _ = step(state, b)
    _assert_alive_and_equal(theta0, before)  # the caller's weights, readable and unchanged
    # results as before the copy: the same step on a state that does not copy (the old path)
    old = TrainState.create(jax.tree.map(jnp.array, before), optax.adam(1e-2), key=0, copy=False)
    for b in batches:
        old, _ = step(old, b)
    chex.assert_trees_all_equal(state.params, old.params)
    chex.assert_trees_all_equal(state.opt_state, old.opt_state)
    # and against an independent reference
    want = _reference_adam(loss, jax.tree.map(jnp.asarray, before), batches, 1e-2)
    chex.assert_trees_all_close(state.params, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nnx_model_arrays_survive_two_donated_steps(rng):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    before = _snapshot(nnx.state(model, nnx.Param))
    batches = [_batch(rng), _batch(rng)]

    def loss(p, b, r):
        del r
        return jnp.mean((nnx.merge(graphdef, p)(b["x"]) - b["y"]) ** 2)

    state = TrainState.create(params, optax.adam(1e-2), key=0)
    step = make_step(loss)
    for b in batches:
        state, _ = step(state, b)
    # the module still works and still holds its (pretrained) weights
    _assert_alive_and_equal(nnx.state(model, nnx.Param), before)
    _assert_alive_and_equal(params, before)
    np.testing.assert_array_equal(
        np.asarray(model(batches[0]["x"])),
        np.asarray(nnx.merge(graphdef, jax.tree.map(jnp.asarray, before))(batches[0]["x"])),
    )
    want = _reference_adam(loss, jax.tree.map(jnp.asarray, before), batches, 1e-2)
    chex.assert_trees_all_close(state.params, want, rtol=1e-5, atol=1e-6)


def test_without_copy_the_first_step_deletes_the_callers_arrays():
    theta0 = {"w": jnp.ones(3)}
    state = TrainState.create(theta0, optax.sgd(0.1), copy=False)
    make_step(lambda p, b, r: jnp.sum(p["w"] ** 2))(state, None)
    assert theta0["w"].is_deleted()  # what copy=True (the default) prevents


def test_methods_and_key_are_copied_too():
    theta0 = {"w": jnp.arange(3.0)}
    key = jax.random.key(7)
    state = TrainState.create(theta0, optax.sgd(0.1), key=key, methods={"anchor": theta0})
    step = make_step(lambda p, b, r: jnp.sum((p["w"] - 1.0) ** 2))
    state, _ = step(state, None)
    state, _ = step(state, None)
    assert not theta0["w"].is_deleted() and not key.is_deleted()
    chex.assert_trees_all_equal(state.methods["anchor"], {"w": jnp.arange(3.0)})
    chex.assert_trees_all_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))


def _anchoring(inner):
    """A transformation whose state holds the very params it was initialised with."""

    def init(params):
        return {"inner": inner.init(params), "anchor": params}

    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state["inner"], params)
        return updates, {"inner": inner_state, "anchor": state["anchor"]}

    return optax.GradientTransformation(init, update)


def test_opt_state_that_holds_params_gets_its_own_buffer():
    loss = lambda p, b, r: jnp.sum(p["w"] ** 2)
    state = TrainState.create({"w": jnp.ones(3)}, _anchoring(optax.sgd(0.1)))
    assert state.opt_state["anchor"]["w"] is not state.params["w"]
    state, _ = make_step(loss)(state, None)
    chex.assert_trees_all_close(state.params["w"], 0.8 * jnp.ones(3))
    chex.assert_trees_all_equal(state.opt_state["anchor"]["w"], jnp.ones(3))
    # without the copy the state holds one buffer twice, which a donated step refuses clearly
    aliased = TrainState.create({"w": jnp.ones(3)}, _anchoring(optax.sgd(0.1)), copy=False)
    with pytest.raises(ValueError, match="'opt_state/anchor/w' and 'params/w'|same array"):
        make_step(loss)(aliased, None)


def test_copies_keep_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), sh)
    state = TrainState.create({"w": w}, optax.sgd(0.1))
    assert state.params["w"].sharding == sh
    ptr = lambda a: a.addressable_shards[0].data.unsafe_buffer_pointer()
    assert ptr(state.params["w"]) != ptr(w)
    chex.assert_trees_all_equal(state.params["w"], w)


def test_create_traces_without_copying():
    params = {"w": jnp.ones((2, 3))}
    shapes = jax.eval_shape(lambda p: TrainState.create(p, optax.adam(1e-3)), params)
    assert shapes.params["w"].shape == (2, 3)
    state = jax.jit(lambda p: TrainState.create(p, optax.adam(1e-3)))(params)
    chex.assert_trees_all_equal(state.params, params)
    assert not params["w"].is_deleted()


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_a_run_compiles_its_step_once(sharded, compiles):
    # A step compiles for its arguments' shardings: fresh uncommitted counters in the first
    # state would make the second step (fed the first one's committed outputs) compile again.
    x = jnp.asarray(np.arange(12.0).reshape(4, 3) / 10, jnp.float32)
    w = jnp.asarray(np.linspace(-1, 1, 6).reshape(3, 2), jnp.float32)
    if sharded:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
        spec = jax.sharding.PartitionSpec(None, "model")
        w = jax.device_put(w, jax.sharding.NamedSharding(mesh, spec))
    loss = lambda p, b: jnp.sum((b @ p["w"]) ** 2)
    state = TrainState.create({"w": w}, optax.sgd(0.1))
    step = make_step(loss, nonfinite="apply")
    jax.block_until_ready(state)

    def two_steps():
        s, _ = step(state, x)
        s, _ = step(s, x)
        return jax.block_until_ready(s)

    before = len(compiles)
    state = two_steps()
    assert len(compiles) - before == 1
    want = np.asarray(w, np.float64)
    x64 = np.asarray(x, np.float64)
    for _ in range(2):  # two plain SGD steps on Σ (x w)², by hand
        want = want - 0.1 * 2 * x64.T @ (x64 @ want)
    np.testing.assert_allclose(np.asarray(state.params["w"]), want, rtol=1e-5)
    assert int(state.step) == 2
