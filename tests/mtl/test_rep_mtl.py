"""Rep-MTL: task saliency, its entropy (TSR) and alignment (CSA) penalties, the loss."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import mtl

# ---------------------------------------------------------------- numpy oracles (loops)


def np_softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def np_saliency_linear_ce(z, ws, y):
    """dL_t/dz of mean softmax cross-entropies of linear heads z @ w_t (closed form)."""
    b = z.shape[0]
    out = []
    for t, w in enumerate(ws):
        p = np_softmax(z @ w)
        p[np.arange(b), y[:, t]] -= 1.0
        out.append(p @ w.T / b)
    return np.stack(out)


def np_entropy(s, channel_axis=None):
    """Mass-weighted normalised entropy of |s| over tasks, element by element."""
    m = np.abs(np.asarray(s, np.float64))
    if channel_axis is not None:
        m = m.sum(axis=channel_axis + 1 if channel_axis >= 0 else channel_axis)
    t = m.shape[0]
    flat = m.reshape(t, -1)
    num = den = 0.0
    for e in range(flat.shape[1]):
        mass = sum(flat[k, e] for k in range(t))
        if mass == 0:
            continue
        h = -sum(flat[k, e] / mass * math.log(flat[k, e] / mass) for k in range(t) if flat[k, e])
        num += mass * h / math.log(t)
        den += mass
    return num / den if den else 0.0


def np_alignment(s, temperature):
    """Sample-wise InfoNCE across ordered task pairs, with loops."""
    s = np.asarray(s, np.float64)
    t, b = s.shape[:2]
    v = s.reshape(t, b, -1)
    u = [[v[k, i] / max(np.linalg.norm(v[k, i]), 1e-12) for i in range(b)] for k in range(t)]
    total = 0.0
    for j, k in itertools.permutations(range(t), 2):
        for i in range(b):
            logits = [float(u[j][i] @ u[k][c]) / temperature for c in range(b)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(x - top) for x in logits))
            total += lse - logits[i]
    return total / (t * (t - 1) * b)


# jitted once per shape: eager calls would compile every primitive separately
entropy = jax.jit(mtl.saliency_entropy, static_argnames=("channel_axis",))
alignment = jax.jit(mtl.saliency_alignment)
d_entropy = jax.jit(jax.grad(mtl.saliency_entropy))
d_alignment = jax.jit(jax.grad(mtl.saliency_alignment))

# ---------------------------------------------------------------- a tiny trunk and heads

T, B, D, H, C = 3, 6, 5, 4, 3


def make_problem(seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    params = {
        "trunk": {"w": r.normal(size=(D, H)).astype(dtype)},
        **{f"head_{i}": {"w": r.normal(size=(H, C)).astype(dtype)} for i in range(T)},
    }
    params = jax.tree.map(jnp.asarray, params)
    batch = {"x": jnp.asarray(r.normal(size=(B, D)).astype(dtype)), "y": r.integers(0, C, (B, T))}
    return params, batch


def features(p, batch):
    return jnp.tanh(batch["x"] @ p["trunk"]["w"])


def head_losses(p, z, batch):
    return jnp.stack(
        [
            optax.softmax_cross_entropy_with_integer_labels(
                z @ p[f"head_{i}"]["w"], batch["y"][:, i]
            ).mean()
            for i in range(T)
        ]
    )


def np_objective(p, batch, tsr_weight, csa_weight, temperature):
    """The Rep-MTL losses L_t + R/T, in numpy float64, from the closed-form saliency."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    z = np.tanh(np.asarray(batch["x"], np.float64) @ p["trunk"]["w"])
    ws = [p[f"head_{i}"]["w"] for i in range(T)]
    y = np.asarray(batch["y"])
    losses = []
    for i, w in enumerate(ws):
        lp = np.log(np_softmax(z @ w))
        losses.append(-lp[np.arange(B), y[:, i]].mean())
    s = np_saliency_linear_ce(z, ws, y)
    reg = tsr_weight * np_entropy(s) + csa_weight * np_alignment(s, temperature)
    return np.asarray(losses) + reg / T


# ---------------------------------------------------------------- task_saliency


def test_task_saliency_matches_closed_form():
    params, batch = make_problem()
    z = features(params, batch)
    f = jax.jit(lambda z: mtl.task_saliency(lambda z_: head_losses(params, z_, batch), z))
    losses, s = f(z)
    ws = [np.asarray(params[f"head_{i}"]["w"], np.float64) for i in range(T)]
    want = np_saliency_linear_ce(np.asarray(z, np.float64), ws, np.asarray(batch["y"]))
    assert s.shape == (T, B, H) and s.dtype == jnp.float32
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, head_losses(params, z, batch), rtol=1e-6)


def test_task_saliency_has_aux_and_bad_inputs():
    z = np.ones((2, 3), np.float32)
    hl = lambda z: (jnp.stack([z.sum(), 2 * z.sum()]), {"n": 7})
    losses, s, aux = jax.jit(lambda z: mtl.task_saliency(hl, z, has_aux=True))(z)
    np.testing.assert_allclose(s[1], 2 * np.ones((2, 3)))
    assert int(aux["n"]) == 7
    with pytest.raises(ValueError, match="z must be"):
        mtl.task_saliency(lambda z: jnp.stack([z.sum()] * 2), jnp.ones(3))
    with pytest.raises(ValueError, match="vector of T losses"):
        mtl.task_saliency(lambda z: z.sum(), z)


# ---------------------------------------------------------------- TSR (entropy)


@pytest.mark.parametrize(
    "shape,channel_axis", [((3, 4, 7), None), ((2, 3, 4, 4, 5), -1), ((4, 2, 3, 5), 1)]
)
def test_entropy_matches_loop_oracle(rng, shape, channel_axis):
    s = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape)
    got = entropy(jnp.asarray(s, jnp.float32), channel_axis=channel_axis)
    np.testing.assert_allclose(got, np_entropy(s, channel_axis), rtol=1e-5)


def test_entropy_hand_values():
    one_owner = np.stack([np.ones((4, 8)), np.zeros((4, 8))]).astype(np.float32)
    assert float(entropy(one_owner)) == 0.0
    # disjoint owners per element: still 0
    mask = np.arange(8) % 2 == 0
    disjoint = np.stack([np.where(mask, 1.0, 0.0), np.where(mask, 0.0, -3.0)])[:, None]
    disjoint = disjoint.astype(np.float32)
    assert float(entropy(disjoint)) == 0.0
    np.testing.assert_allclose(entropy(np.ones((3, 4, 8), np.float32)), 1.0, rtol=1e-6)
    # one element (masses 1, 3) and one element (masses 2, 2): weights 4/8 each
    s = np.asarray([[[1.0, 2.0]], [[-3.0, 2.0]]], np.float32)
    h13 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    np.testing.assert_allclose(entropy(s), 0.5 * h13 + 0.5 * 1.0, rtol=1e-6)
    # zero saliency: no mass, value 0 and a finite gradient
    z = np.zeros((2, 3, 4), np.float32)
    assert float(entropy(z)) == 0.0
    assert bool(jnp.all(jnp.isfinite(d_entropy(z))))


def test_entropy_invariances(rng):
    s = rng.normal(size=(3, 5, 6)).astype(np.float32)
    h = float(entropy(s))
    for c in (1e-6, 0.3, 1e4):
        np.testing.assert_allclose(entropy(c * s), h, rtol=1e-5)
    signs = rng.choice([-1.0, 1.0], size=s.shape).astype(np.float32)
    np.testing.assert_allclose(entropy(signs * s), h, rtol=1e-6)
    np.testing.assert_allclose(entropy(s[[2, 0, 1]]), h, rtol=1e-6)
    perm = rng.permutation(6)
    np.testing.assert_allclose(entropy(s[..., perm]), h, rtol=1e-6)
    # concentrating one task's saliency lowers the entropy
    sharper = s * np.asarray([10.0, 1.0, 1.0], np.float32)[:, None, None]
    assert float(entropy(sharper)) < h


# ---------------------------------------------------------------- CSA (alignment)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_alignment_matches_loop_oracle(rng, temperature):
    s = rng.normal(size=(3, 4, 2, 3))
    got = alignment(jnp.asarray(s, jnp.float32), temperature=temperature)
    np.testing.assert_allclose(got, np_alignment(s, temperature), rtol=1e-5)


def test_alignment_hand_values():
    b, tau = 4, 0.25
    u = np.eye(b, 6, dtype=np.float32)  # orthonormal per-sample saliencies, the same for both tasks
    want = math.log(math.exp(1 / tau) + (b - 1)) - 1 / tau
    np.testing.assert_allclose(alignment(np.stack([u, 3 * u]), temperature=tau), want, rtol=1e-5)
    # positives opposite instead: the same value with -1/tau
    bad = math.log(math.exp(-1 / tau) + (b - 1)) + 1 / tau
    np.testing.assert_allclose(alignment(np.stack([u, -u]), temperature=tau), bad, rtol=1e-5)
    # all similarities equal (zero saliency): log B, finite gradient
    z = np.zeros((2, b, 3), np.float32)
    np.testing.assert_allclose(alignment(z, temperature=tau), math.log(b), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(d_alignment(z))))
    # one sample: nothing to contrast
    np.testing.assert_allclose(alignment(np.ones((2, 1, 3), np.float32)), 0.0, atol=1e-6)


def test_alignment_invariances(rng):
    s = rng.normal(size=(3, 5, 4)).astype(np.float32)
    a = float(alignment(s, temperature=0.3))
    scale = rng.uniform(0.01, 100.0, size=(3, 5, 1)).astype(np.float32)
    np.testing.assert_allclose(alignment(scale * s, temperature=0.3), a, rtol=1e-5)
    np.testing.assert_allclose(alignment(s[[1, 2, 0]], temperature=0.3), a, rtol=1e-6)
    perm = rng.permutation(5)
    np.testing.assert_allclose(alignment(s[:, perm], temperature=0.3), a, rtol=1e-5)
    # not invariant to a task's sign flip (it reverses the positives)
    assert (
        abs(float(alignment(s * np.float32([-1, 1, 1])[:, None, None], temperature=0.3)) - a) > 1e-3
    )


# ---------------------------------------------------------------- regulariser and loss


def test_regularizer_is_the_weighted_sum(rng):
    s = rng.normal(size=(2, 4, 3)).astype(np.float32)
    reg_fn = jax.jit(mtl.rep_mtl_regularizer)
    reg, terms = reg_fn(s, tsr_weight=0.3, csa_weight=2.0, temperature=0.2)
    np.testing.assert_allclose(terms["tsr"], np_entropy(s), rtol=1e-5)
    np.testing.assert_allclose(terms["csa"], np_alignment(s, 0.2), rtol=1e-5)
    np.testing.assert_allclose(reg, 0.3 * terms["tsr"] + 2.0 * terms["csa"], rtol=1e-6)
    # a zero weight skips its term (a Python 0 at trace time)
    reg0, terms0 = jax.jit(functools.partial(mtl.rep_mtl_regularizer, tsr_weight=0))(s)
    assert float(terms0["tsr"]) == 0.0 and float(reg0) == pytest.approx(float(terms0["csa"]))


@pytest.mark.slow
def test_per_task_gradients_match_numpy_oracle_and_feed_aggregators():
    kw = dict(tsr_weight=0.7, csa_weight=0.4, temperature=0.5)
    with jax.enable_x64(True):
        params, batch = make_problem(1, np.float64)
        loss_fn = mtl.rep_mtl_loss_fn(features, head_losses, **kw)
        plain_fn = mtl.rep_mtl_loss_fn(features, head_losses, tsr_weight=0.0, csa_weight=0.0)

        @jax.jit
        def run(p):
            stacked, info = mtl.task_grad_fn(loss_fn)(p, batch)
            return stacked, info["losses"], jax.jacrev(plain_fn)(p, batch), plain_fn(p, batch)

        stacked, losses, plain_grad, plain = run(params)
        assert losses.dtype == jnp.float64 and stacked["trunk"]["w"].dtype == jnp.float64
        np.testing.assert_allclose(losses, np_objective(params, batch, **kw), rtol=1e-10)
        # row t of the stacked gradients is the second-order gradient of L_t + R/T: along
        # random directions, against central differences of the numpy objective
        r = np.random.default_rng(3)
        eps = 1e-5
        for _ in range(2):
            d = jax.tree.map(lambda a: r.normal(size=a.shape), params)
            plus = jax.tree.map(lambda a, v: np.asarray(a) + eps * v, params, d)
            minus = jax.tree.map(lambda a, v: np.asarray(a) - eps * v, params, d)
            fd = (np_objective(plus, batch, **kw) - np_objective(minus, batch, **kw)) / (2 * eps)
            dots = sum(
                np.asarray(g).reshape(T, -1) @ v.ravel()
                for g, v in zip(jax.tree.leaves(stacked), jax.tree.leaves(d), strict=True)
            )
            np.testing.assert_allclose(dots, fd, rtol=1e-6)
        # zero weights: the plain task losses
        np.testing.assert_allclose(plain, head_losses(params, features(params, batch), batch))
        # the penalty's gradient reaches the trunk (through z) and every head
        for name in params:
            diff = np.abs(np.asarray(stacked[name]["w"]) - np.asarray(plain_grad[name]["w"]))
            assert diff.max() > 1e-6, name
        # EW (mean scale) gives the trunk mean_t grad (L_t + R/T); a head the sum over
        # tasks of its rows, grad (L_own + R)
        ew = mtl.aggregate(mtl.linear, head_rules=mtl.HEAD_RULES)
        out, _ = ew.update(stacked, ew.init(params), params)
        rows = jax.tree.map(lambda a: np.asarray(a), stacked)
        np.testing.assert_allclose(out["trunk"]["w"], rows["trunk"]["w"].mean(0), rtol=1e-6)
        np.testing.assert_allclose(out["head_1"]["w"], rows["head_1"]["w"].sum(0), rtol=1e-6)


def test_has_aux_passes_the_trunk_state():
    params, batch = make_problem(5)
    feats = lambda p, b, st: (features(p, b), {"n": st["n"] + 1})
    heads = lambda p, z, b, st: head_losses(p, z, b)
    loss_fn = jax.jit(mtl.rep_mtl_loss_fn(feats, heads, has_aux=True))
    losses, aux = loss_fn(params, batch, {"n": 1})
    assert losses.shape == (T,) and aux == {"n": 2}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tsr_weight": float("nan")}, "tsr_weight=nan"),
        ({"tsr_weight": -1.0}, "tsr_weight=-1.0"),
        ({"csa_weight": float("inf")}, "csa_weight=inf"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"csa_weight": True}, "csa_weight=True"),
    ],
)
def test_bad_hyperparameters_raise_at_build_time(kw, match):
    with pytest.raises(ValueError, match=match):
        mtl.rep_mtl_loss_fn(features, head_losses, **kw)
    with pytest.raises(ValueError, match=match):
        mtl.rep_mtl_regularizer(jnp.ones((2, 3, 4)), **kw)


def test_bad_saliency_and_axes():
    with pytest.raises(ValueError, match="T >= 2"):
        mtl.saliency_entropy(jnp.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="T >= 2"):
        mtl.saliency_alignment(jnp.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="at least 3 axes"):
        mtl.saliency_entropy(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="floating"):
        mtl.saliency_alignment(jnp.ones((2, 3, 4), jnp.int32))
    for ax in (0, 2, -2, 1.0):
        with pytest.raises(ValueError, match="channel_axis"):
            mtl.saliency_entropy(jnp.ones((2, 3, 4)), channel_axis=ax)
    with pytest.raises(ValueError, match="eps"):
        mtl.saliency_entropy(jnp.ones((2, 3, 4)), eps=0.0)
    one = mtl.rep_mtl_loss_fn(features, lambda p, z, b: head_losses(p, z, b)[:1])
    params, batch = make_problem()
    with pytest.raises(ValueError, match="T >= 2"):
        jax.eval_shape(one, params, batch)
    with pytest.raises(TypeError, match="features_fn"):
        mtl.rep_mtl_loss_fn(None, head_losses)
