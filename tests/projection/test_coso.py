"""CoSO: history orthogonality, Frequent-Directions sketch, low-rank Adam, boundary hook."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import projection as pj


def _grads(rng, shape, n):
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(n)]


@pytest.mark.slow
def test_sketch_spans_the_exact_top_subspace_when_rank_suffices(rng):
    d, k = 12, 4
    basis, _ = np.linalg.qr(rng.normal(size=(d, 3)))  # the stream has rank 3 <= k
    sketch = jnp.zeros((d, k))
    stream = []
    for _ in range(5):
        a = basis @ rng.normal(size=(3, 7))
        stream.append(a)
        u, s, _ = jnp.linalg.svd(jnp.asarray(a, jnp.float32), full_matrices=False)
        sketch = pj.frequent_directions_update(sketch, u, s)
    # span(sketch) == span(basis): projecting the basis on the sketch's range loses nothing
    q, _ = np.linalg.qr(np.asarray(sketch)[:, :3])
    np.testing.assert_allclose(np.linalg.norm(q.T @ basis, axis=0), 1.0, atol=1e-5)
    # and with rank >= stream rank FD is exact: B B^T == sum A A^T
    cov = sum(a @ a.T for a in stream)
    np.testing.assert_allclose(np.asarray(sketch @ sketch.T), cov, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_sketch_error_bound_when_rank_is_short(rng):
    """FD guarantee: 0 <= A A^T - B B^T, and its spectral norm is <= ||A||_F^2 / l."""
    d, l = 10, 3
    sketch = jnp.zeros((d, l))
    cov = np.zeros((d, d))
    for _ in range(6):
        a = rng.normal(size=(d, 5))
        cov += a @ a.T
        u, s, _ = jnp.linalg.svd(jnp.asarray(a, jnp.float32), full_matrices=False)
        sketch = pj.frequent_directions_update(sketch, u, s)
    err = cov - np.asarray(sketch @ sketch.T, np.float64)
    assert np.linalg.eigvalsh(err).min() > -1e-3 * np.trace(cov)  # B B^T <= A A^T
    assert np.linalg.norm(err, 2) <= np.trace(cov) / l + 1e-3


@pytest.mark.slow
def test_first_step_is_low_rank_adam(rng):
    """Step 1: P = top-r right singular vectors, update = -lr sign-like Adam step mapped back."""
    g = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    tx = pj.coso(0.1, [("w", True)], proj_rank=2, sketch_rank=3)
    u, st = tx.update({"w": g}, tx.init({"w": g}), None)
    _, _, vt = np.linalg.svd(np.asarray(g))
    p = vt[:2].T  # [out, r]
    low = np.asarray(g) @ p
    # Adam's first step with eps on the raw sqrt(v) (coso/adamw.py): eps / sqrt(1 - b2)
    want = -0.1 * (low / (np.abs(low) + 1e-6 / np.sqrt(1 - 0.999))) @ p.T
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-4, atol=1e-6)
    # projector sign is arbitrary; its span is what counts
    np.testing.assert_allclose(np.abs(np.asarray(st.projector[0]).T @ p), np.eye(2), atol=1e-5)


def test_eps_is_placed_as_the_reference_adamw(rng):
    """Steps 1-4 on a fixed gradient against a numpy loop of coso/adamw.py's update:
    ``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, not optax's ``m_hat / (sqrt(v_hat)
    + eps)`` (a large eps separates the two)."""
    g = rng.normal(size=(6, 4)).astype(np.float32)
    lr, b1, b2, eps = 0.05, 0.8, 0.9, 0.3
    tx = pj.coso(lr, [("w", True)], proj_rank=2, sketch_rank=2, b1=b1, b2=b2, eps=eps)
    state = tx.init({"w": jnp.asarray(g)})
    _, _, vt = np.linalg.svd(g.astype(np.float64))
    p = vt[:2].T
    m = v = np.zeros((6, 2))
    for t in range(1, 5):
        u, state = tx.update({"w": jnp.asarray(g)}, state, None)
        low = g @ p  # the same top-2 subspace each step; the sign of p cancels in low @ p.T
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low**2
        size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        want = -size * (m / (np.sqrt(v) + eps)) @ p.T
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-4, atol=1e-6)
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        other = -lr * (mh / (np.sqrt(vh) + eps)) @ p.T
        assert np.abs(want - other).max() > 1e-3  # the check can tell the placements apart


@pytest.mark.slow
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_history_is_orthogonal_and_updates_avoid_it(rng, svd):
    params = {"a": {"kernel": jnp.zeros((9, 8))}, "b": jnp.zeros(3)}
    tx = optax.chain(
        optax.masked(optax.adam(1e-2), {"a": {"kernel": False}, "b": True}),
        pj.coso(1e-2, [("kernel", True)], proj_rank=2, sketch_rank=3, svd=svd, power_iters=3),
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for task in range(3):
        for _ in range(4):
            g = {"a": {"kernel": _grads(rng, (9, 8), 1)[0]}, "b": jnp.ones(3)}
            u, state = update(g, state, params)
            cs = pj.find_state(state, pj.CoSOState)[0]
            h = cs.history[0]
            uk = u["a"]["kernel"]
            assert jnp.linalg.norm(uk @ h) <= 1e-5 * jnp.linalg.norm(uk)
            assert jnp.linalg.norm(u["b"]) > 0  # the masked Adam trains the rest
        state = pj.map_state(state, pj.CoSOState, lambda s: pj.coso_next_task(s, threshold=0.98))
        cs = pj.find_state(state, pj.CoSOState)[0]
        r = int(cs.hrank[0])
        assert 0 < r <= 8 and int(cs.task) == task + 1 and int(cs.count) == 0
        hh = np.asarray(cs.history[0])
        np.testing.assert_allclose(hh[:, :r].T @ hh[:, :r], np.eye(r), atol=1e-5)
        np.testing.assert_array_equal(hh[:, r:], 0.0)
        chex.assert_trees_all_equal(cs.mu[0], jnp.zeros_like(cs.mu[0]))


@pytest.mark.slow
def test_history_energy_threshold(rng):
    out = 6
    tx = pj.coso(1e-2, [("w", True)], proj_rank=1, sketch_rank=4)
    st = tx.init({"w": jnp.zeros((5, out))})
    # A sketch with energies 0.6, 0.3, 0.1 (cumulative 0.6, 0.9, 1.0)
    q, _ = np.linalg.qr(rng.normal(size=(out, 3)))
    sk = jnp.asarray(np.pad(q * np.sqrt([0.6, 0.3, 0.1]), ((0, 0), (0, 1))), jnp.float32)
    st = st._replace(sketch=(sk,))
    assert int(pj.coso_next_task(st, threshold=0.98).hrank[0]) == 2  # 0.6, 0.9 < 0.98
    assert int(pj.coso_next_task(st, threshold=0.9).hrank[0]) == 1  # strict: 0.9 is not < 0.9


@pytest.mark.slow
def test_randomized_range_recovers_a_low_rank_matrix(rng):
    a = rng.normal(size=(30, 4)) @ rng.normal(size=(4, 20))
    u, s = pj.randomized_range(jnp.asarray(a, jnp.float32), 4, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(a)[1][:4], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(u @ (u.T @ a)), a, atol=1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"proj_rank=0 must be a positive integer"):
        pj.coso(1e-3, [("w", True)], proj_rank=0)
    with pytest.raises(ValueError, match=r"svd='qr'"):
        pj.coso(1e-3, [("w", True)], svd="qr")
    tx = pj.coso(1e-3, [("w", True)])
    with pytest.raises(ValueError, match=r"'w' has shape \(3, 3, 2\)"):
        tx.init({"w": jnp.zeros((3, 3, 2))})
    with pytest.raises(ValueError, match=r"select no parameter"):
        tx.init({"v": jnp.zeros((3, 3))})
    st = tx.init({"w": jnp.zeros((3, 3))})
    for bad in (0.0, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"threshold=.* must be in \(0, 1\]"):
            pj.coso_next_task(st, threshold=bad)
    for kw, msg in (
        ({"eps": float("nan")}, r"coso: eps=nan must be finite"),
        ({"eps": float("inf")}, r"coso: eps=inf must be finite"),
        ({"eps": 0.0}, r"coso: eps=0.0 must be > 0"),
        ({"b1": float("nan")}, r"b1=nan"),
        ({"decay": float("inf")}, r"decay=inf"),
    ):
        with pytest.raises(ValueError, match=msg):
            pj.coso(1e-3, [("w", True)], **kw)
    for lr in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match=r"coso: learning_rate="):
            pj.coso(lr, [("w", True)])


def test_nonfinite_sketch_is_rejected_at_the_task_boundary():
    st = pj.coso(1e-3, [("w", True)]).init({"w": jnp.zeros((4, 3))})
    sketch = st.sketch[0].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"coso_next_task: gradient sketch of target 0 .* 1 non"):
        pj.coso_next_task(st._replace(sketch=(sketch,)), threshold=0.98)
