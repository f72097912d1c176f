import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.train import NonFiniteError, TrainState, make_step


def _loss(params, batch, rng):
    del rng
    pred = batch["x"] @ params["w"]
    return jnp.mean((pred - batch["y"]) ** 2)


def test_step_matches_manual_sgd(rng):
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    }
    state = TrainState.create({"w": w}, optax.sgd(0.1), key=0)
    step = make_step(_loss)
    g = jax.grad(lambda w: _loss({"w": w}, batch, None))(w)
    expected = w - 0.1 * g
    loss0 = _loss({"w": w}, batch, None)
    new, metrics = step(state, batch)  # donates state (and w)
    chex.assert_trees_all_close(new.params["w"], expected, rtol=1e-6)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["loss"], loss0, rtol=1e-6)


def test_state_is_donated():
    state = TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1))
    old = state.params["w"]
    step = make_step(_loss)
    step(state, {"x": jnp.ones((2, 3)), "y": jnp.ones(2)})
    assert old.is_deleted()


def test_nonfinite_skip_and_raise():
    state = TrainState.create({"w": jnp.ones(3)}, optax.adam(0.1))
    bad = {"x": jnp.full((2, 3), jnp.nan), "y": jnp.ones(2)}
    good = {"x": jnp.ones((2, 3)), "y": jnp.ones(2)}
    step = make_step(_loss, nonfinite="skip", donate=False)
    s1, m = step(state, bad)
    assert not bool(m["finite"]) and int(s1.skipped) == 1
    chex.assert_trees_all_equal(s1.params, state.params)
    chex.assert_trees_all_equal(s1.opt_state, state.opt_state)
    s2, m = step(s1, good)
    assert bool(m["finite"]) and int(s2.skipped) == 1
    raising = make_step(_loss, nonfinite="raise", donate=False)
    with pytest.raises(NonFiniteError, match="step 0"):
        raising(state, bad)
    with pytest.raises(ValueError, match="nonfinite"):
        make_step(_loss, nonfinite="ignore")


def test_default_raises_naming_the_step_and_hands_back_the_state():
    """The default policy: a NaN step raises, is not applied, and the run can go on."""
    state = TrainState.create({"w": jnp.ones(3)}, optax.adam(0.1))
    bad = {"x": jnp.full((2, 3), jnp.nan), "y": jnp.ones(2)}
    good = {"x": jnp.ones((2, 3)), "y": jnp.ones(2)}
    step = make_step(_loss)  # jitted, donated, nonfinite="raise"
    state, _ = step(state, good)
    before = jax.tree.map(np.array, (state.params, state.opt_state))  # copies, not views
    with pytest.raises(NonFiniteError, match=r"at step 1 \(update skipped") as e:
        step(state, bad)
    assert state.params["w"].is_deleted()  # donated: the error holds the state to go on from
    kept = e.value.state
    chex.assert_trees_all_equal((kept.params, kept.opt_state), before)
    assert int(kept.step) == 2 and int(kept.skipped) == 1
    kept, m = step(kept, good)
    assert bool(m["finite"]) and int(kept.step) == 3


def test_overflowing_update_of_finite_gradients_is_caught():
    """Finite gradients, a learning rate that sends the weights to Inf."""
    batch = {"x": jnp.ones((2, 3)), "y": jnp.full(2, -10.0)}
    state = TrainState.create({"w": jnp.ones(3)}, optax.sgd(1e38))
    with pytest.raises(NonFiniteError, match="step 0"):
        make_step(_loss, donate=False)(state, batch)
    skipped, m = make_step(_loss, nonfinite="skip", donate=False)(state, batch)
    assert np.isfinite(float(m["grad_norm"])) and not bool(m["finite"])
    chex.assert_trees_all_equal(skipped.params, state.params)
    applied, _ = make_step(_loss, nonfinite="apply", donate=False)(state, batch)
    assert not np.isfinite(np.asarray(applied.params["w"])).all()  # asked for: applied


@pytest.mark.slow
def test_unjitted_step_raises_eagerly_and_skips_when_traced():
    state = TrainState.create({"w": jnp.ones(3)}, optax.adam(0.1))
    bad = {"x": jnp.full((2, 3), jnp.nan), "y": jnp.ones(2)}
    step = make_step(_loss, jit=False)
    assert step.nonfinite == "raise"
    with pytest.raises(NonFiniteError, match="step 0"):
        step(state, bad)
    # inside a trace it cannot raise: the update is skipped and counted
    new, m = jax.jit(step)(state, bad)
    assert not bool(m["finite"]) and int(new.skipped) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    xs = {"x": jnp.stack([bad["x"], jnp.ones((2, 3))]), "y": jnp.ones((2, 2))}
    new, _ = jax.lax.scan(lambda st, b: step(st, b), state, xs)
    assert int(new.skipped) == 1 and int(new.step) == 2
    assert np.isfinite(np.asarray(new.params["w"])).all()


def test_post_update_runs_inside_step():
    def ema(state):
        avg = state.methods["avg"]
        return state.replace(
            methods={"avg": jax.tree.map(lambda a, p: 0.5 * a + 0.5 * p, avg, state.params)}
        )

    state = TrainState.create(
        {"w": jnp.zeros(3)}, optax.sgd(1.0), methods={"avg": {"w": jnp.zeros(3)}}
    )
    step = make_step(lambda p, b, r: -jnp.sum(p["w"]), post_update=ema)
    new, _ = step(state, None)
    chex.assert_trees_all_close(new.params["w"], jnp.ones(3))
    chex.assert_trees_all_close(new.methods["avg"]["w"], 0.5 * jnp.ones(3))


def test_reusing_a_donated_state_is_a_clear_error():
    state = TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1))
    step = make_step(_loss)
    batch = {"x": jnp.ones((2, 3)), "y": jnp.ones(2)}
    new, _ = step(state, batch)
    with pytest.raises(ValueError, match=r"state leaf 'step' was deleted: .*donate"):
        step(state, batch)  # the state passed in, not the one returned
    new, _ = step(new, batch)  # the returned state goes on
    assert int(new.step) == 2


def test_one_buffer_twice_in_a_donated_state_is_a_clear_error():
    state = TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1))
    state = state.replace(methods={"anchor": state.params})
    with pytest.raises(ValueError, match="'params/w' and 'methods/anchor/w' are the same array"):
        make_step(_loss)(state, {"x": jnp.ones((2, 3)), "y": jnp.ones(2)})
    # not donated, the same state is fine
    make_step(_loss, donate=False)(state, {"x": jnp.ones((2, 3)), "y": jnp.ones(2)})


def test_loss_without_rng_is_detected_by_its_signature(rng):
    """loss_fn(params, batch) gets no key; (params, batch, rng) and *args get the step's key."""
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    }
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    seen = []

    def no_rng(params, batch):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    def with_rng(params, batch, rng):
        seen.append(rng)
        return no_rng(params, batch)

    def var_args(params, *args):
        seen.append(len(args))
        return no_rng(params, args[0])

    out = {}
    for f in (no_rng, with_rng, var_args):
        state = TrainState.create({"w": w}, optax.sgd(0.1), key=0)
        new, metrics = make_step(f, donate=False)(state, batch)
        out[f.__name__] = (new.params["w"], metrics["loss"])
    chex.assert_trees_all_close(out["no_rng"], out["with_rng"])
    chex.assert_trees_all_close(out["no_rng"], out["var_args"])
    assert seen[-1] == 2  # *args received batch and the key
    assert jax.dtypes.issubdtype(seen[0].dtype, jax.dtypes.prng_key)
    with pytest.raises(TypeError, match="must take"):
        make_step(lambda params: 0.0)
