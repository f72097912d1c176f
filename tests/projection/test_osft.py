"""OSFT: two-sided projection of the final update, protected outputs, rank schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import projection as pj

RULES = [("w", True)]


def _setup(rng, shape=(10, 8), ratio=0.5):
    w0 = jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {"w": w0, "b": jnp.zeros(shape[1])}
    tx = optax.chain(optax.adam(3e-2), pj.osft(RULES))
    st = tx.init(params)
    st = pj.map_state(
        st,
        pj.OSFTState,
        lambda s: pj.osft_next_task(s, pj.target_leaves(params, RULES), ratios=ratio),
    )
    return params, tx, st


def test_update_after_adam_avoids_both_frozen_spaces(rng):
    params, tx, st = _setup(rng)
    o = pj.find_state(st, pj.OSFTState)[0]
    assert int(o.rank[0]) == 4
    u_svd, _, vt = np.linalg.svd(np.asarray(params["w"]), full_matrices=False)
    np.testing.assert_allclose(
        np.abs(u_svd[:, :4].T @ np.asarray(o.u_high[0][:, :4])), np.eye(4), atol=1e-5
    )
    update = jax.jit(tx.update)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, st = update(g, st, params)
        du = u["w"]
        n = jnp.linalg.norm(du)
        assert n > 0
        assert jnp.linalg.norm(o.u_high[0].T @ du) <= 1e-5 * n
        assert jnp.linalg.norm(du @ o.v_high[0]) <= 1e-5 * n


@pytest.mark.slow
def test_protected_outputs_and_top_triplets_survive_training(rng):
    params, tx, st = _setup(rng, shape=(10, 8), ratio=0.5)
    w0 = params["w"]
    u0, s0, vt0 = np.linalg.svd(np.asarray(w0), full_matrices=False)
    x_prot = jnp.asarray(rng.normal(size=(5, 4)) @ u0[:, :4].T, jnp.float32)  # in span(U_h)
    x_new = jnp.asarray(rng.normal(size=(64, 10)), jnp.float32)
    # a target reachable inside the complement, so the constrained fit can succeed
    delta = (np.eye(10) - u0[:, :4] @ u0[:, :4].T) @ rng.normal(size=(10, 8))
    delta = delta @ (np.eye(8) - vt0[:4].T @ vt0[:4])
    y_new = x_new @ (w0 + jnp.asarray(delta, jnp.float32))
    loss = lambda p: jnp.mean((x_new @ p["w"] + p["b"] - y_new) ** 2)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    l0 = loss(params)
    for _ in range(200):
        params, st = step(params, st)
    assert loss(params) < 0.2 * l0
    w = params["w"]
    assert float(jnp.max(jnp.abs(x_prot @ w - x_prot @ w0))) < 1e-4
    # the frozen triplets are still singular triplets of W with the same values
    np.testing.assert_allclose(u0[:, :4].T @ np.asarray(w) @ vt0[:4].T, np.diag(s0[:4]), atol=1e-4)


def test_ranks_and_schedules():
    assert pj.osft_ranks([(10, 8), (4, 4)], 0.5) == [4, 2]
    assert pj.osft_ranks([(10, 8)], 1.0) == [7]  # at least one direction stays trainable
    assert pj.rising_ratio(0) == pytest.approx(0.07)
    assert pj.rising_ratio(3) == pytest.approx(0.28)
    assert pj.rising_ratio(100) == 1.0
    r = pj.adaptive_ratios([0.2, 0.4, 0.6], min_ratio=0.1, max_ratio=0.5)
    # I_n = [0.5, 1, 1.5]; r = 0.1 + I_n * 0.4
    np.testing.assert_allclose(r, [0.3, 0.5, 0.7])


def test_io_cosine_similarity(rng):
    x = rng.normal(size=(6, 5))
    assert pj.io_cosine_similarity(x, 2.0 * x) == pytest.approx(1.0, abs=1e-6)
    assert pj.io_cosine_similarity(x, -x) == pytest.approx(-1.0, abs=1e-6)
    y = rng.normal(size=(6, 5))
    want = np.mean(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    assert pj.io_cosine_similarity(x, y) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_narrow_bases_give_the_same_updates(rng):
    """``max_ratio`` shrinks the stored bases to the frozen rank: the projection is unchanged."""
    shape = (12, 9)
    w0 = jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {"w": w0, "b": jnp.zeros(shape[1])}
    states, txs = [], []
    for max_ratio in (1.0, 0.5):
        tx = optax.chain(optax.adam(3e-2), pj.osft(RULES, max_ratio=max_ratio))
        st = pj.map_state(
            tx.init(params),
            pj.OSFTState,
            lambda s: pj.osft_next_task(s, pj.target_leaves(params, RULES), ratios=0.5),
        )
        txs.append(tx)
        states.append(st)
    wide, narrow = (pj.find_state(st, pj.OSFTState)[0] for st in states)
    assert wide.u_high[0].shape == (12, 9) and narrow.u_high[0].shape == (12, 4)
    assert narrow.v_high[0].shape == (9, 4) and int(narrow.rank[0]) == 4
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        outs = []
        for i, tx in enumerate(txs):
            u, states[i] = jax.jit(tx.update)(g, states[i], params)
            outs.append(u["w"])
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        assert jnp.linalg.norm(narrow.u_high[0].T @ outs[1]) <= 1e-5 * jnp.linalg.norm(outs[1])
    with pytest.raises(ValueError, match=r"rank 6, above the 4 columns its state holds"):
        pj.osft_next_task(narrow, [w0], ratios=0.7)
    with pytest.raises(ValueError, match=r"max_ratio=0 must be in \(0, 1\]"):
        pj.osft(RULES, max_ratio=0)


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match=r"select no parameter"):
        pj.osft([("nope", True)]).init({"w": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\)"):
        pj.osft([(".*", True)]).init({"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)})
    st = pj.osft(RULES).init({"w": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"ratio=1.5 must be in \[0, 1\]"):
        pj.osft_next_task(st, [jnp.zeros((3, 4))], ratios=1.5)
    with pytest.raises(ValueError, match=r"weight 0 has shape \(4, 3\)"):
        pj.osft_next_task(st, [jnp.zeros((4, 3))], ratios=0.5)
    with pytest.raises(ValueError, match=r"input \(2, 3\) and output \(2, 4\) differ"):
        pj.io_cosine_similarity(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"min_ratio"):
        pj.adaptive_ratios([1.0], min_ratio=0.8, max_ratio=0.2)


def test_nonfinite_weights_are_rejected_at_the_task_boundary():
    st = pj.osft(RULES).init({"w": jnp.zeros((3, 4))})
    for bad in (jnp.nan, jnp.inf):
        w = jnp.ones((3, 4)).at[2, 1].set(bad)
        with pytest.raises(ValueError, match=r"osft_next_task: weight 0 .* 1 non-finite"):
            pj.osft_next_task(st, [w], ratios=0.5)
