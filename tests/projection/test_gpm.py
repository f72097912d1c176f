"""GPM: projection after Adam, memory growth by the energy rule, conv patch order, recording."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cljax import projection as pj

TARGETS = [(r"kernel", True)]


def _params(rng):
    return {
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            "bias": jnp.zeros(6, jnp.float32),
        },
    }


def _random_like(tree, rng):
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


@pytest.mark.slow
def test_update_after_adam_is_orthogonal_to_memory(rng):
    params = _params(rng)
    tx = optax.chain(optax.adam(1e-2), pj.gpm(TARGETS, freeze_1d=True))
    state = tx.init(params)
    reps = (jnp.asarray(rng.normal(size=(40, 18))), jnp.asarray(rng.normal(size=(5, 8))))
    state = pj.map_state(state, pj.GPMState, lambda s: pj.gpm_next_task(s, reps, threshold=0.9))
    gs = pj.find_state(state, pj.GPMState)[0]
    assert [int(r) for r in gs.rank] != [0, 0]
    update = jax.jit(tx.update)
    for _ in range(3):  # Adam moments build up: the projection must hold every step
        updates, state = update(_random_like(params, rng), state, params)
        for i, u in enumerate([updates["Conv_0"]["kernel"], updates["Dense_0"]["kernel"]]):
            u2 = u.reshape(-1, u.shape[-1])
            m = gs.memory[i]
            assert jnp.linalg.norm(m.T @ u2) <= 1e-5 * jnp.linalg.norm(u2)
            assert jnp.linalg.norm(u2) > 0
        # 1-D parameters are frozen after the first task
        chex.assert_trees_all_equal(updates["Dense_0"]["bias"], jnp.zeros(6))


def test_without_memory_the_update_is_adams():
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.arange(12.0).reshape(4, 3)}
    tx = optax.chain(optax.adam(0.1), pj.gpm([("w", True)]))
    ref = optax.adam(0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    r, _ = ref.update(grads, ref.init(params), params)
    chex.assert_trees_all_close(u, r, rtol=1e-6)


def _spectrum_rows(rng, sigmas, d, n=64):
    """Rows X = A diag(sigmas) V^T with orthonormal A [n, k], V [d, k]: known spectrum."""
    k = len(sigmas)
    a, _ = np.linalg.qr(rng.normal(size=(n, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return (a * np.asarray(sigmas)) @ v.T, v


@pytest.mark.slow
def test_memory_grows_as_the_threshold_dictates(rng):
    d = 10
    params = {"w": jnp.zeros((d, 3))}
    tx = pj.gpm([("w", True)])
    state = tx.init(params)
    # Energies 0.5, 0.3, 0.15, 0.05 (sigma^2). Cumulative: 0.5, 0.8, 0.95, 1.0.
    energies = np.array([0.5, 0.3, 0.15, 0.05])
    x, v = _spectrum_rows(rng, np.sqrt(energies), d)
    # First task, strict "<": eps=0.95 keeps 2 (0.95 is not < 0.95); eps=0.96 keeps 3.
    assert int(pj.gpm_next_task(state, [x], threshold=0.95).rank[0]) == 2
    assert int(pj.gpm_next_task(state, [x], threshold=0.96).rank[0]) == 3
    assert int(pj.gpm_next_task(state, [x], threshold=0.5).rank[0]) == 0
    s1 = pj.gpm_next_task(state, [x], threshold=0.85)
    assert int(s1.rank[0]) == 2
    m = np.asarray(s1.memory[0])
    # The stored basis spans the two dominant directions of the data.
    np.testing.assert_allclose(np.linalg.norm(m[:, :2].T @ v[:, :2], axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(m[:, 2:], 0.0)
    # Later task on the same data: captured = 0.8 of the ORIGINAL energy; with eps = 0.97
    # the loop adds 0.15 (0.8 < 0.97) then 0.05 (0.95 < 0.97) -> 2 new vectors.
    s2 = pj.gpm_next_task(s1, [x], threshold=0.97)
    assert int(s2.rank[0]) == 4 and int(s2.task) == 2
    # eps = 0.8: already captured (0.8 is not < 0.8) -> nothing added.
    assert int(pj.gpm_next_task(s1, [x], threshold=0.8).rank[0]) == 2
    # eps = 0.9: adds one (0.8 < 0.9 -> +0.15 = 0.95 >= 0.9).
    assert int(pj.gpm_next_task(s1, [x], threshold=0.9).rank[0]) == 3
    m2 = np.asarray(s2.memory[0][:, :4])
    np.testing.assert_allclose(m2.T @ m2, np.eye(4), atol=1e-5)


def test_threshold_one_keeps_every_direction_and_no_noise(rng):
    # eps = 1: all four directions of rank-4 data (the smallest with 0.1 % of the energy),
    # whatever the rounding of the running energy sum; the same data again adds nothing
    # (what is left of it is SVD noise), and new data adds its own directions only.
    d = 12
    state = pj.gpm([("w", True)]).init({"w": jnp.zeros((d, 3))})
    for seed in range(5):
        x, v = _spectrum_rows(np.random.default_rng(seed), [3.0, 2.0, 1.0, 0.1], d, n=50)
        s1 = pj.gpm_next_task(state, [x], threshold=1.0)
        assert int(s1.rank[0]) == 4, seed
        m = np.asarray(s1.memory[0][:, :4])
        np.testing.assert_allclose(np.linalg.norm(m.T @ v, axis=0), 1.0, atol=1e-4)
        assert int(pj.gpm_next_task(s1, [x], threshold=1.0).rank[0]) == 4, seed
    y, _ = _spectrum_rows(rng, [1.0, 1.0], d, n=30)
    assert int(pj.gpm_next_task(s1, [y], threshold=1.0).rank[0]) == 6


def test_memory_is_capped_at_the_input_dimension(rng):
    d = 4
    state = pj.gpm([("w", True)]).init({"w": jnp.zeros((d, 2))})
    for _ in range(3):
        state = pj.gpm_next_task(state, [rng.normal(size=(20, d))], threshold=1.0)
    assert int(state.rank[0]) == d
    m = np.asarray(state.memory[0])
    np.testing.assert_allclose(m.T @ m, np.eye(d), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel,strides,padding,dilation",
    [
        ((3, 3), 1, "SAME", 1),
        ((3, 2), 2, "VALID", 1),
        ((3, 3), (2, 1), 1, 2),
        ((1, 1), 1, "SAME", 1),
    ],
)
def test_conv_patches_match_the_kernel_flattening(rng, kernel, strides, padding, dilation):
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(*kernel, 3, 5)), jnp.float32)
    pad = [(padding, padding)] * 2 if isinstance(padding, int) else padding
    st = (strides, strides) if isinstance(strides, int) else strides
    ref = jax.lax.conv_general_dilated(
        x, k, st, pad, rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    p = pj.conv_patches(x, kernel, strides=strides, padding=padding, kernel_dilation=dilation)
    np.testing.assert_allclose(p @ k.reshape(-1, 5), ref.reshape(-1, 5), rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID", use_bias=False)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(6, use_bias=False)(x))
        return nn.Dense(3, use_bias=False)(x)


@pytest.mark.slow
def test_recorded_inputs_reproduce_each_layer(rng):
    net = _Net()
    x = jnp.asarray(rng.normal(size=(3, 7, 7, 2)), jnp.float32)
    v = net.init(jax.random.key(0), x)
    rec = jax.jit(lambda v, x: pj.record_layer_inputs(net, v, x))(v, x)  # also traceable
    assert sorted(rec) == ["Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    reps = pj.gpm_representations(v, TARGETS, rec)  # target order: Conv_0, Dense_0, Dense_1
    assert [r.shape for r in reps] == [(3 * 9, 18), (3, 36), (3, 6)]
    # patches @ kernel is the conv output, whose relu is the next layer's input
    conv_out = reps[0] @ v["params"]["Conv_0"]["kernel"].reshape(18, 4)
    np.testing.assert_allclose(jax.nn.relu(conv_out).reshape(3, -1), reps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_outputs_on_protected_inputs_survive_training(rng):
    """Train a new task after protecting the old inputs: their outputs move by < 1e-4."""
    d, n_out = 12, 5
    w0 = jnp.asarray(rng.normal(size=(d, n_out)) * 0.3, jnp.float32)
    params = {"w": w0}
    x_old, _ = _spectrum_rows(rng, [3.0, 2.0, 1.0, 0.5], d, n=50)
    tx = optax.chain(optax.adam(3e-2), pj.gpm([("w", True)]))
    state = tx.init(params)
    state = pj.map_state(state, pj.GPMState, lambda s: pj.gpm_next_task(s, [x_old], threshold=1.0))
    x_new = jnp.asarray(rng.normal(size=(64, d)), jnp.float32)
    y_new = jnp.asarray(rng.normal(size=(64, n_out)), jnp.float32)
    loss = lambda p: jnp.mean((x_new @ p["w"] - y_new) ** 2)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    l0 = loss(params)
    for _ in range(100):
        params, state = step(params, state)
    assert loss(params) < 0.7 * l0  # it did learn
    before, after = x_old @ w0, x_old @ params["w"]
    assert float(jnp.max(jnp.abs(after - before))) < 1e-4


def test_bad_inputs(rng):
    params = _params(rng)
    tx = pj.gpm(TARGETS)
    state = tx.init(params)
    reps = (rng.normal(size=(4, 18)), rng.normal(size=(4, 8)))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold=.* must be in \(0, 1\]"):
            pj.gpm_next_task(state, reps, threshold=bad)
    with pytest.raises(ValueError, match=r"select no parameter"):
        pj.gpm([("nothing_here", True)]).init(params)
    with pytest.raises(ValueError, match=r"Dense_0/bias.*only 2/4-D"):
        pj.gpm([(r"Dense_0", True)]).init(params)
    with pytest.raises(ValueError, match=r"representation 1 has shape \(4, 7\)"):
        pj.gpm_next_task(state, (reps[0], rng.normal(size=(4, 7))), threshold=0.9)
    with pytest.raises(ValueError, match=r"got 1 representations for 2 targets"):
        pj.gpm_next_task(state, reps[:1], threshold=0.9)
    with pytest.raises(ValueError, match=r"no GPMState"):
        pj.map_state(optax.adam(1.0).init(params), pj.GPMState, lambda s: s)


def test_nonfinite_representations_are_rejected(rng):
    state = pj.gpm(TARGETS).init(_params(rng))
    good = rng.normal(size=(4, 8))
    for bad_value in (np.nan, np.inf):
        bad = rng.normal(size=(4, 18))
        bad[1, 2] = bad_value
        with pytest.raises(ValueError, match=r"representation 0 .* 1 non-finite value"):
            pj.gpm_next_task(state, (bad, good), threshold=0.9)


class _NNXNet(nnx.Module):
    """The NNX twin of ``_Net``: conv (stride 2, VALID), then two linear layers."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), strides=2, padding="VALID", use_bias=False, rngs=rngs)
        self.layers = nnx.List(
            [nnx.Linear(36, 6, use_bias=False, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)]
        )

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.layers[1](nnx.relu(self.layers[0](x)))


@pytest.mark.slow
def test_record_layer_inputs_on_an_nnx_model(rng):
    model = _NNXNet(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(3, 7, 7, 2)), jnp.float32)
    rec = pj.record_layer_inputs(model, x)
    assert sorted(rec) == ["conv/kernel", "layers/0/kernel", "layers/1/kernel"]
    assert nnx.Linear.__call__ is nnx.Linear.__dict__["__call__"]  # the wrapper is removed
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    reps = pj.gpm_representations(params, TARGETS, rec)  # paths: "conv/kernel", no "/value"
    assert [r.shape for r in reps] == [(3 * 9, 18), (3, 36), (3, 6)]
    # Independent reference: the layers' inputs computed by hand.
    conv_out = jax.lax.conv_general_dilated(
        x, model.conv.kernel[...], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h0 = jax.nn.relu(conv_out).reshape(3, -1)
    np.testing.assert_allclose(reps[1], h0, rtol=1e-5, atol=1e-6)
    h1 = jax.nn.relu(h0 @ model.layers[0].kernel[...])
    np.testing.assert_allclose(reps[2], h1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        reps[0] @ model.conv.kernel[...].reshape(18, 4),
        conv_out.reshape(-1, 4),
        rtol=1e-5,
        atol=1e-5,
    )

    @jax.jit
    def record(params, x):  # traceable: rebuild the module from its state inside jit
        return pj.record_layer_inputs(nnx.merge(graphdef, params, rest), x)

    chex.assert_trees_all_close(record(params, x), rec, rtol=1e-5, atol=1e-6)
    # The memory hook takes them as it takes linen representations.
    tx = pj.gpm(TARGETS)
    state = pj.gpm_next_task(tx.init(params), reps, threshold=0.97)
    assert all(int(r) > 0 for r in state.rank)


def test_record_layer_inputs_rejects_other_callables():
    with pytest.raises(TypeError, match=r"neither a flax.linen nor a flax.nnx Module"):
        pj.record_layer_inputs(lambda x: x, jnp.ones(3))
