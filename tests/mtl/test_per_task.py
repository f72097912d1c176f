import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.mtl import head_mask, per_task_grads

RULES = [(r"^head_\d+/", True)]


def model(rng, t=3):
    params = {"trunk": {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}}
    for i in range(t):
        params[f"head_{i}"] = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}

    def loss_fn(p, batch):
        f = jnp.tanh(batch @ p["trunk"]["w"])
        return jnp.stack([jnp.mean((f @ p[f"head_{i}"]["w"] - i) ** 2) for i in range(t)])

    return params, loss_fn


@pytest.mark.slow
@pytest.mark.parametrize(
    "task_batch_size,unroll", [(None, False), (2, False), (2, True), (1, True)]
)
def test_matches_per_task_jax_grad(rng, task_batch_size, unroll):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    w = jnp.array([1.0, 0.5, 2.0])
    tg = jax.jit(
        lambda p: per_task_grads(
            loss_fn,
            p,
            x,
            head_rules=RULES,
            weights=w,
            task_batch_size=task_batch_size,
            unroll=unroll,
        )
    )(params)
    for i in range(3):
        gi = jax.grad(lambda p, i=i: w[i] * loss_fn(p, x)[i])(params)
        chex.assert_trees_all_close(
            tg.shared["trunk"]["w"][i], gi["trunk"]["w"], rtol=1e-5, atol=1e-6
        )
        chex.assert_trees_all_close(
            tg.heads[f"head_{i}"]["w"], gi[f"head_{i}"]["w"], rtol=1e-5, atol=1e-6
        )
    assert tg.shared["head_0"]["w"] is None and tg.heads["trunk"]["w"] is None
    np.testing.assert_allclose(tg.losses, loss_fn(params, x), rtol=1e-6)


def test_head_mask_from_rules(rng):
    params, _ = model(rng, 2)
    assert head_mask(params, RULES) == {
        "trunk": {"w": False},
        "head_0": {"w": True},
        "head_1": {"w": True},
    }


def test_bad_inputs(rng):
    params, loss_fn = model(rng, 2)
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="must return a \\[T\\] vector"):
        per_task_grads(lambda p, b: loss_fn(p, b).sum(), params, x)
    with pytest.raises(ValueError, match="task_batch_size=0"):
        per_task_grads(loss_fn, params, x, task_batch_size=0)
    with pytest.raises(ValueError, match="per_task_grads: unroll=True needs a task_batch_size"):
        per_task_grads(loss_fn, params, x, unroll=True)
