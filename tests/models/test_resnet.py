import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import ResNet18


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count_matches_torchvision():
    v = jax.eval_shape(ResNet18(1000).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert _count(v["params"]) == 11_689_512  # torchvision.models.resnet18
    # Flax BatchNorm holds running mean and var like PyTorch (num_batches_tracked aside).
    assert _count(v["batch_stats"]) == 2 * 4800


@pytest.mark.slow
def test_small_input_forward_and_batch_stats():
    model = ResNet18(None, width=4, small_input=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)

    @jax.jit  # one program: op by op, or one jit per call, a conv net compiles slowly
    def init_and_apply(key, x):
        v = model.init(key, x)
        feats = model.apply(v, x)
        out, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        return v, feats, out, new

    v, feats, out, new = init_and_apply(jax.random.key(0), x)
    assert feats.shape == (2, 32)
    assert out.shape == (2, 32)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], new["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_bad_width():
    with pytest.raises(ValueError, match="width=0"):
        ResNet18(width=0)
