"""Continual methods: hyperparameter checks, GPM's per-layer sample counts, normalised PMNIST."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import continual as cl
from cljax import data, losses
from cljax import projection as pj
from cljax.data import Task
from cljax.train import TrainState

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: cl.ewc(weight=NAN), r"ewc: weight=nan must be finite"),
        (lambda: cl.ewc(weight=INF), r"ewc: weight=inf must be finite"),
        (lambda: cl.ewc(weight=1.0, gamma=NAN), r"ewc: gamma=nan"),
        (lambda: cl.ewc(weight=1.0, fisher_samples=2.5), r"ewc: fisher_samples=2.5"),
        (lambda: cl.lwf(weight=INF), r"lwf: weight=inf must be finite"),
        (lambda: cl.lwf(weight=1.0, temperature=NAN), r"lwf: temperature=nan"),
        (lambda: cl.l2_anchor(weight=NAN), r"l2_anchor: weight=nan"),
        (lambda: cl.osft([("k", True)], ratio=NAN), r"osft: ratio=nan"),
        (lambda: cl.osft([("k", True)], ratio=[0.5, INF]), r"osft: ratio\[1\]=inf"),
        (lambda: cl.osft([("k", True)], ratio="fixed"), r"osft: ratio='fixed'"),
        (lambda: cl.osft([("k", True)], max_ratio=NAN), r"osft: max_ratio=nan"),
        (lambda: cl.gpm([("k", True)], None, threshold=NAN), r"threshold=nan"),
        (lambda: cl.gpm([("k", True)], None, num_samples=0), r"gpm: num_samples=0"),
        (lambda: cl.gpm([("k", True)], None, num_samples=[3, 0]), r"num_samples\[1\]=0"),
        (lambda: cl.coso(NAN, [("k", True)]), r"coso: learning_rate=nan"),
        (lambda: cl.coso(1e-3, [("k", True)], threshold=INF), r"threshold=inf"),
        (lambda: losses.ewc_penalty({}, None, weight=INF), r"ewc_penalty: weight=inf"),
        (
            lambda: losses.relation_distillation(
                jnp.ones((2, 3)),
                jnp.ones((2, 3)),
                jnp.ones((2, 3)),
                jnp.ones((2, 3)),
                temperature=INF,
            ),
            r"relation_distillation: temperature=inf must be finite",
        ),
        (
            lambda: losses.supervised_contrastive_loss(jnp.ones((2, 1, 3)), temperature=NAN),
            r"supervised_contrastive_loss: temperature=nan",
        ),
    ],
)
def test_nonfinite_hyperparameters_are_rejected_by_name(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(7, use_bias=False)(x))
        x = nn.relu(nn.Dense(5, use_bias=False)(x))
        return nn.Dense(3, use_bias=False)(x)


@pytest.mark.slow
def test_gpm_per_layer_sample_counts_match_separate_recordings():
    """num_samples=[a, b, c]: layer k's memory is GPM's update from the first n_k examples."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=40).astype(np.int32)
    task = Task("t", ("a", "b", "c"), x, y, x[:4], y[:4], x[:4], y[:4])
    model = _MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
    targets = [(r"Dense_\d/kernel", True)]
    rec = lambda p, xs: pj.record_layer_inputs(model, {"params": p}, xs)  # noqa: E731
    counts = [4, 30, 12]
    method = cl.gpm(targets, rec, threshold=0.9, num_samples=counts)
    tx = method.wrap_optimizer(optax.sgd(0.1))
    state = TrainState.create(params, tx, key=0, methods={})
    layout = cl.HeadLayout.build("class", [task])
    ctx = cl.TaskContext(0, (task,), layout, lambda p, xs: model.apply({"params": p}, xs), 0)
    got = pj.find_state(method.end_task(state, ctx).opt_state, pj.GPMState)[0]
    # oracle: each layer from its own recording of its own count
    fresh = pj.find_state(state.opt_state, pj.GPMState)[0]
    reps = [
        pj.gpm_representations(params, targets, rec(params, jnp.asarray(x[:n])))[k]
        for k, n in enumerate(counts)
    ]
    want = pj.gpm_next_task(fresh, tuple(reps), threshold=0.9)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # the counts matter: layer 1 from 4 examples instead of 30 gets another memory
    alt = pj.gpm_next_task(fresh, (reps[0], reps[1][:4], reps[2]), threshold=0.9)
    assert not np.allclose(np.asarray(alt.memory[1]), np.asarray(got.memory[1]), atol=1e-3)
    with pytest.raises(ValueError, match=r"gpm: got 2 num_samples for 3 targets"):
        cl.gpm(targets, rec, threshold=0.9, num_samples=[4, 5]).end_task(state, ctx)


def test_permuted_mnist_normalised_as_gpm_loader():
    raw = data.permuted_mnist(2, seed=3)
    norm = data.permuted_mnist(2, seed=3, normalize=True)
    for a, b in zip(raw, norm, strict=True):
        np.testing.assert_array_equal(a.y_train, b.y_train)
        np.testing.assert_allclose(b.x_test, (a.x_test - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
        assert b.x_train.dtype == np.float32
    assert np.isclose(norm[0].x_train.min(), -0.1307 / 0.3081, atol=1e-5)
    with pytest.raises(ValueError, match=r"normalize=1"):
        data.permuted_mnist(1, normalize=1)


def test_methods_are_namedtuples_of_pure_hooks_with_namedtuple_states():
    """The protocol of cljax.stateful: init first, a NamedTuple state, reusable objects."""
    params = {"w": jnp.ones((2, 3))}
    for method, state_type in [
        (cl.naive(), optax.EmptyState),
        (cl.ewc(weight=1.0), losses.EWCState),
        (cl.lwf(), cl.TeacherState),
        (cl.l2_anchor(weight=1.0), cl.AnchorState),
        (cl.gpm([("w", True)], None), optax.EmptyState),
    ]:
        assert isinstance(method, cl.Method) and cl.Method._fields[:2] == ("init", "update")
        state = method.init(params)
        assert isinstance(state, state_type)
        out, new = method.update(params, state, step=1)  # the identity for all of these
        assert out is params and new is state
    frozen = cl.lwf().init(params)
    assert float(frozen.active) == 0.0 and frozen.teacher["w"] is not params["w"]  # a copy


def test_run_sequence_refuses_what_is_not_a_method():
    task = Task("t", ("a", "b"), *[np.zeros((2, 3), np.float32), np.zeros(2, np.int32)] * 3)
    with pytest.raises(TypeError, match=r"methods\[1\] is a dict, not a cljax.continual.Method"):
        cl.run_sequence(
            [task],
            apply_fn=lambda p, x: x @ p,
            params=jnp.zeros((3, 2)),
            optimizer=optax.sgd(0.1),
            steps_per_task=1,
            batch_size=2,
            methods=[cl.naive(), {"name": "ewc"}],
        )


def test_checkpoints_of_dict_method_states_restore_into_the_namedtuples(tmp_path):
    """Runs saved before the states became NamedTuples ({"teacher", "active"} and {}) resume:
    orbax names a NamedTuple's leaves by field, as it names a dict's by key."""
    from cljax.checkpoint import CheckpointManager

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    old = {
        "lwf": {"teacher": {"w": params["w"] + 1}, "active": jnp.ones(())},
        "l2": {"anchor": {"w": params["w"] + 2}, "active": jnp.ones(())},
        "gpm": {},
    }
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"methods": old})
    target = {
        "methods": {
            "lwf": cl.lwf(name="lwf").init(params),
            "l2": cl.l2_anchor(weight=1.0).init(params),
            "gpm": cl.gpm([("w", True)], None).init(params),
        }
    }
    _, tree, _ = ckpt.restore_latest(target)
    got = tree["methods"]
    assert isinstance(got["lwf"], cl.TeacherState) and isinstance(got["l2"], cl.AnchorState)
    np.testing.assert_array_equal(got["lwf"].teacher["w"], params["w"] + 1)
    np.testing.assert_array_equal(got["l2"].anchor["w"], params["w"] + 2)
    assert float(got["lwf"].active) == 1.0 and got["gpm"] == optax.EmptyState()
