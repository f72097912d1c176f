import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax.mtl as mtl
from cljax.data import Task
from cljax.train import TrainState


def test_delta_m():
    assert mtl.delta_m([90.0, 80.0], [90.0, 80.0]) == 0.0
    np.testing.assert_allclose(mtl.delta_m([99.0, 72.0], [90.0, 80.0]), 100 * (0.1 - 0.1) / 2)
    np.testing.assert_allclose(
        mtl.delta_m([1.1, 0.9], [1.0, 1.0], [False, True]), 100 * (-0.1 - 0.1) / 2
    )
    with pytest.raises(ValueError, match="must be equal"):
        mtl.delta_m([1.0], [1.0, 2.0])


def _tasks(rng):
    x = rng.normal(size=(64, 6)).astype(np.float32)
    ya = (x[:, 0] > 0).astype(np.int32)
    yb = (x[:, 1] > 0).astype(np.int32)
    mk = lambda n, y: Task(n, ("0", "1"), x, y, x[:16], y[:16], x[:16], y[:16])
    return mk("a", ya), mk("b", yb)


def test_multitask_batch_shares_indices(rng):
    a, b = _tasks(rng)
    batch = mtl.multitask_batch((a, b), 3, 8, seed=1)
    ref = a.batch_at(3, 8, seed=1)
    np.testing.assert_array_equal(batch["x"], ref["x"])
    np.testing.assert_array_equal(batch["y"][:, 0], ref["y"])


class _Trunk(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(8)(x))


@pytest.mark.slow
@pytest.mark.parametrize("fmtl", [False, True])
def test_step_trains_and_weighting_state_moves(rng, fmtl):
    tasks = _tasks(rng)
    model = mtl.MultiHead(_Trunk(), (2, 2))
    params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]

    def loss_fn(p, batch, ms):
        return mtl.classification_losses(model.apply({"params": p}, batch["x"]), batch["y"]), ms

    kw = dict(head_rules=mtl.HEAD_RULES, has_aux=True)
    gf = (
        mtl.fmtl(loss_fn, mtl.mgda, rho=0.05, **kw)
        if fmtl
        else mtl.mtl_grad_fn(loss_fn, mtl.mgda, **kw)
    )
    uw = mtl.uncertainty_weighting(2, learning_rate=0.01)
    step = mtl.make_mtl_step(gf, weighting=uw)
    state = TrainState.create(
        params, optax.adam(0.05), key=0, methods={"model_state": {}, "weighting": uw.init()}
    )
    losses = []
    for s in range(30):
        b = mtl.multitask_batch(tasks, s, 16)
        state, m = step(state, {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"])})
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not np.allclose(state.methods["weighting"].log_vars, 0.0)
    acc = mtl.evaluate_accuracy(
        lambda x: model.apply({"params": state.params}, x), tasks, split="test"
    )
    assert acc.shape == (2,) and np.all(acc > 60)


@pytest.mark.slow
def test_nan_in_one_task_stops_the_step_by_default():
    """One task's NaN loss reaches every update through the aggregator: never applied."""
    from cljax.train import NonFiniteError

    def losses_fn(p, batch):  # task 1's loss is NaN when batch["scale"] is
        return jnp.stack([jnp.sum((batch["x"] @ p["w"]) ** 2), batch["scale"] * jnp.sum(p["w"])])

    good = {"x": jnp.ones((4, 3)), "scale": jnp.float32(1.0)}
    bad = {**good, "scale": jnp.float32(np.nan)}
    tx = optax.chain(mtl.aggregate(mtl.pcgrad, key=0), optax.adam(0.05))
    grad_fn = mtl.task_grad_fn(losses_fn)
    state = TrainState.create({"w": jnp.ones(3)}, tx, key=0)
    step = mtl.make_mtl_step(grad_fn)  # nonfinite="raise"
    state, m = step(state, good)
    assert bool(m["finite"])
    before = np.array(state.params["w"])
    with pytest.raises(NonFiniteError, match="at step 1") as e:
        step(state, bad)
    np.testing.assert_array_equal(e.value.state.params["w"], before)
    state, _ = step(e.value.state, good)  # and the run goes on
    assert int(state.step) == 3 and int(state.skipped) == 1
    skip = mtl.make_mtl_step(grad_fn, nonfinite="skip")
    new, m = skip(state, bad)
    assert not bool(m["finite"]) and int(new.skipped) == 2
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        mtl.make_mtl_step(grad_fn, nonfinite="ignore")


def test_step_with_random_loss_weighting_draws_fresh_weights_each_step():
    """The step gives the weighting its key before the gradient and at its update (a random
    weighting needs it in both): each step's weights are a new draw on the simplex."""
    rlw = mtl.random_loss_weighting(2)

    def grad_fn(params, batch, weights=None):
        def losses(p):
            return jnp.stack([jnp.sum((p["w"] - 1.0) ** 2), jnp.sum((p["w"] + 1.0) ** 2)])

        grads = jax.grad(lambda p: jnp.sum(weights * losses(p)))(params)
        return grads, {"losses": losses(params)}

    step = mtl.make_mtl_step(grad_fn, weighting=rlw)
    state = TrainState.create(
        {"w": jnp.zeros(3)}, optax.sgd(0.1), key=0, methods={"weighting": rlw.init()}
    )
    seen = []
    for _ in range(2):
        state, m = step(state, None)
        seen.append(np.asarray(m["weights"]))
        np.testing.assert_allclose(seen[-1].sum(), 1.0, rtol=1e-6)
    assert not np.allclose(seen[0], seen[1])
    assert state.methods["weighting"] == optax.EmptyState()
