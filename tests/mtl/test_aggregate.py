import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax.mtl as mtl
from cljax.train import TrainState

RULES = [(r"^head_\d+/", True)]

AGGREGATORS = {
    "linear": mtl.linear,
    "mgda": mtl.mgda,
    "pcgrad": mtl.pcgrad,
    "cagrad": functools.partial(mtl.cagrad, c=0.4),
    "imtl_g": mtl.imtl_g,
    "nash_mtl": mtl.nash_mtl,
    "graddrop": mtl.graddrop,
    "aligned_mtl": mtl.aligned_mtl,
}


def model(rng, t=3):
    params = {"trunk": {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}}
    for i in range(t):
        params[f"head_{i}"] = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}

    def loss_fn(p, batch):
        f = jnp.tanh(batch @ p["trunk"]["w"])
        return jnp.stack([jnp.mean((f @ p[f"head_{i}"]["w"] - i) ** 2) for i in range(t)])

    return params, loss_fn


def _by_loop(loss_fn, params, x):
    """Per-task gradients from jax.grad of each scalar loss, stacked by a Python loop."""
    t = len(loss_fn(params, x))
    rows = [jax.grad(lambda p, i=i: loss_fn(p, x)[i])(params) for i in range(t)]
    return jax.tree.map(lambda *a: jnp.stack(a), *rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_chain_update_is_the_aggregator_on_the_trunk_and_owner_gradients_on_heads(rng, name):
    agg = AGGREGATORS[name]
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    stacked, info = jax.jit(mtl.task_grad_fn(loss_fn))(params, x)
    ref = _by_loop(loss_fn, params, x)
    chex.assert_trees_all_close(stacked, ref, rtol=1e-5, atol=1e-6)
    tx = optax.chain(mtl.aggregate(agg, key=7, head_rules=RULES), optax.sgd(1.0))
    state = tx.init(params)
    upd, state2 = jax.jit(tx.update)(stacked, state, params)
    # the key of step 0 is the second half of split(key(7)); the state keeps the first
    k_next, k0 = jax.random.split(jax.random.key(7))
    want_trunk = agg({"trunk": ref["trunk"]}, key=k0)["trunk"]
    chex.assert_trees_all_close(
        jax.tree.map(lambda u: -u, upd["trunk"]), want_trunk, rtol=2e-5, atol=1e-7
    )
    for i in range(3):  # each head: its own task's gradient
        np.testing.assert_allclose(
            -upd[f"head_{i}"]["w"], ref[f"head_{i}"]["w"][i], rtol=1e-5, atol=1e-6
        )
    assert jax.tree.structure(upd) == jax.tree.structure(params)
    agg_state = state2[0]
    assert isinstance(agg_state, mtl.AggregateState)
    np.testing.assert_array_equal(jax.random.key_data(agg_state.key), jax.random.key_data(k_next))


@pytest.mark.slow
def test_pcgrad_key_moves_each_step_and_matches_mtl_grad_fn(rng):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    stacked, _ = mtl.task_grad_fn(loss_fn)(params, x)
    tx = mtl.aggregate(mtl.pcgrad, key=jax.random.key(3), head_rules=RULES)
    state = tx.init(params)
    key = jax.random.key(3)
    for _ in range(3):
        out, state = tx.update(stacked, state, params)
        key, sub = jax.random.split(key)
        want, _ = mtl.mtl_grad_fn(loss_fn, mtl.pcgrad, head_rules=RULES)(params, x, key=sub)
        chex.assert_trees_all_close(out, want, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pcgrad", "mgda", "linear"])
def test_fmtl_through_aggregate_equals_fmtl(rng, name):
    agg = AGGREGATORS[name]
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    kw = dict(rho=0.3, adaptive=True, normalization="separate", head_rules=RULES)
    grads, info = jax.jit(mtl.fmtl_grad_fn(loss_fn, **kw))(params, x)
    assert isinstance(grads, mtl.FMTLGrads)
    tx = mtl.aggregate(agg, key=5, head_rules=RULES)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    _, sub = jax.random.split(jax.random.key(5))
    want, want_info = mtl.fmtl(loss_fn, agg, **kw)(params, x, key=sub)
    chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(info["sam_losses"], want_info["sam_losses"])


@pytest.mark.slow
def test_later_transforms_see_the_plain_tree(rng):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    stacked, _ = mtl.task_grad_fn(loss_fn)(params, x)
    heads = RULES
    tx = optax.chain(
        mtl.aggregate(mtl.mgda, head_rules=heads), optax.clip_by_global_norm(1.0), optax.adam(0.1)
    )
    state = TrainState.create(params, tx).apply_gradients(stacked)
    g = mtl.mtl_grad_fn(loss_fn, mtl.mgda, head_rules=heads)(params, x)[0]
    manual = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    upd, _ = manual.update(g, manual.init(params), params)
    chex.assert_trees_all_close(state.params, optax.apply_updates(params, upd), rtol=1e-6)


def test_errors(rng):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    stacked, _ = mtl.task_grad_fn(loss_fn)(params, x)
    tx = mtl.aggregate(mtl.mgda, head_rules=RULES)
    state = tx.init(params)
    with pytest.raises(ValueError, match="leading task axis.*'head_0/w'"):
        tx.update(params, state, params)  # not stacked
    bad = dict(stacked, trunk={"w": stacked["trunk"]["w"][:2]})
    with pytest.raises(
        ValueError, match=re.escape("'trunk/w': params has (4, 5), updates has (2, 4, 5)")
    ):
        tx.update(bad, state, params)
    all_heads = mtl.aggregate(mtl.mgda, head_rules=[(r".", True)])
    with pytest.raises(ValueError, match="every leaf as a head"):
        all_heads.update(stacked, all_heads.init(params), params)
    with pytest.raises(TypeError, match="neither callable"):
        mtl.aggregate(3)


def test_stateful_aggregator_keeps_its_state(rng):
    """An optax transformation as the aggregator: its state is AggregateState.inner."""
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def init(p):
        return jnp.zeros((), jnp.int32)

    def update(g, count, p=None, *, key):
        return mtl.pcgrad(g, key=key), count + 1

    counting = optax.GradientTransformationExtraArgs(init, update)
    tx = mtl.aggregate(counting, key=1, head_rules=RULES)
    stacked, _ = mtl.task_grad_fn(loss_fn)(params, x)
    out, state = tx.update(stacked, tx.init(params), params)
    assert int(state.inner) == 1
    _, sub = jax.random.split(jax.random.key(1))
    chex.assert_trees_all_close(
        out["trunk"], mtl.pcgrad({"trunk": stacked["trunk"]}, key=sub)["trunk"]
    )
    fg, _ = mtl.fmtl_grad_fn(loss_fn, rho=0.1, head_rules=RULES)(params, x)
    _, state = tx.update(fg, state, params)
    assert int(state.inner) == 3  # clean and flatness directions: two calls


@pytest.mark.slow
def test_make_mtl_step_with_aggregate_trains_without_model_state(rng):
    params, loss_fn = model(rng, t=2)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    for grad_fn in (
        mtl.task_grad_fn(loss_fn),
        mtl.fmtl_grad_fn(loss_fn, rho=0.05, head_rules=RULES),
    ):
        tx = optax.chain(mtl.aggregate(mtl.pcgrad, key=0, head_rules=RULES), optax.adam(0.05))
        state = TrainState.create(params, tx)
        step = mtl.make_mtl_step(grad_fn)
        first = None
        for _ in range(30):
            state, metrics = step(state, x)
            first = float(metrics["loss"]) if first is None else first
        assert float(metrics["loss"]) < 0.5 * first
        chex.assert_tree_all_finite(state.params)
