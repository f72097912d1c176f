import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.mtl import dwa, random_loss_weighting, uncertainty_weighting


def test_uncertainty_weighting_moves_towards_the_optimum():
    uw = uncertainty_weighting(2, learning_rate=0.05)
    s = uw.init()
    np.testing.assert_allclose(uw.weights(s), [0.5, 0.5])
    losses = jnp.array([4.0, 0.25])
    update = jax.jit(uw.update)
    for _ in range(400):
        _, s = update(losses, s)
    # The minimiser of L e^{-s}/2 + s/2 is s = log L.
    np.testing.assert_allclose(s.log_vars, np.log([4.0, 0.25]), atol=0.05)
    w = uw.weights(s)
    assert w[1] > w[0]


@pytest.mark.slow
def test_dwa_matches_the_formula():
    w8 = dwa(2, steps_per_epoch=2, temperature=2.0)
    s = w8.init()
    history = [[1.0, 1.0], [1.0, 1.0], [0.5, 0.9], [0.5, 0.9], [0.4, 0.9], [0.4, 0.9]]
    for i, loss in enumerate(history):
        if i < 4:
            np.testing.assert_allclose(w8.weights(s), [1.0, 1.0])
        _, s = w8.update(jnp.array(loss), s)
    r = np.array([0.4 / 0.5, 0.9 / 0.9])
    ref = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(w8.weights(s), ref, rtol=1e-5)


def test_random_loss_weighting():
    rlw = random_loss_weighting(3)
    w1 = rlw.weights(rlw.init(), jax.random.key(0))
    w2 = rlw.weights(rlw.init(), jax.random.key(1))
    np.testing.assert_allclose(w1.sum(), 1.0, rtol=1e-6)
    assert np.all(w1 > 0) and not np.allclose(w1, w2)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        rlw.weights(rlw.init())
    with pytest.raises(ValueError, match=r"update\(\) needs key="):
        rlw.update(jnp.ones(3), rlw.init())


@pytest.mark.parametrize("name", ["uw", "dwa", "rlw"])
def test_update_returns_the_losses_times_the_weights_of_the_step(name):
    """optax's order: ``update(losses, state) -> (outputs, new_state)``; the outputs are the
    losses weighted as this step's gradient weighted them (the weights of the old state)."""
    make = {
        "uw": lambda: uncertainty_weighting(3, learning_rate=0.1),
        "dwa": lambda: dwa(3, steps_per_epoch=1),
        "rlw": lambda: random_loss_weighting(3),
    }[name]
    wt, key = make(), jax.random.key(4)
    s = wt.init()
    for i in range(3):  # DWA's weights leave 1 after two epochs (the third step)
        losses = jnp.array([1.0 + i, 0.5, 2.0 / (1 + i)])
        want = np.asarray(wt.weights(s, key)) * np.asarray(losses)
        out, s = wt.update(losses, s, key=key)
        np.testing.assert_array_equal(out, want)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="num_tasks=0"):
        uncertainty_weighting(0)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        dwa(2, steps_per_epoch=0)
    with pytest.raises(ValueError, match="temperature=0"):
        dwa(2, steps_per_epoch=1, temperature=0)
