"""PRD as a continual method, and the class-incremental scenario's growing head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import continual as cl
from cljax import losses
from cljax.data import Task


def _tasks(n=2, classes=2, dim=4, per=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        y = np.tile(np.arange(classes, dtype=np.int32), per // classes)
        x = rng.normal(size=(per, dim)).astype(np.float32)
        names = tuple(f"c{t}{k}" for k in range(classes))
        out.append(Task(f"t{t}", names, x, y, x[:2], y[:2], x, y))
    return out


def test_class_scenario_tests_over_the_classes_seen_so_far():
    """Outputs of classes not seen yet are out of the argmax: huge logits there do not count
    after task 0, and do after task 1 (when they are seen)."""
    tasks = _tasks()

    def apply_fn(p, x):  # the right class of task 0 a little ahead, task 1's classes huge
        y0 = (jnp.arange(x.shape[0]) % 2)[:, None]
        z = jnp.zeros((x.shape[0], 4)) + p["b"]
        z = z + 1.0 * (jnp.arange(4)[None] == y0)
        return z.at[:, 2:].add(100.0)

    res = cl.run_sequence(
        tasks,
        apply_fn=apply_fn,
        params={"b": jnp.zeros(4)},
        optimizer=optax.sgd(0.0),
        steps_per_task=1,
        batch_size=4,
        scenario="class",
    )
    assert res.accuracy[0, 0] == 1.0  # only classes 0-1 seen: the +100 outputs are masked
    assert res.accuracy[1, 0] == 0.0  # now classes 2-3 are seen and win


def _prd(identity_groups=True):
    feats = lambda p, x: x @ p["enc"]  # noqa: E731
    proj = lambda p, f: f @ p["proj"]  # noqa: E731
    protos = lambda p: p["w"]  # noqa: E731
    aug = lambda key, x: x + 0.1 * jax.random.normal(key, x.shape)  # noqa: E731
    groups = np.array([0, 0, 1, 1]) if identity_groups else None
    return cl.prd(feats, proj, protos, aug, groups=groups, temperature=0.2), feats, proj, aug


@pytest.mark.slow
def test_prd_loss_is_the_sum_of_its_three_terms():
    rng = np.random.default_rng(1)
    params = {
        "enc": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "proj": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    prd, feats, proj, aug = _prd()
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.asarray([2, 3, 2, 3, 2, 3], jnp.int32)
    key = jax.random.key(3)
    batch = {"x": x, "y": y, "old_mask": jnp.asarray([1, 1, 0, 0], bool), "key": key}
    teacher = jax.tree.map(lambda a: a + 0.3, params)
    mstate = cl.TeacherState(teacher, jnp.ones(()))
    total, aux = prd.loss(params, batch, None, mstate, None)
    # oracle: the library losses composed by hand, the same two views
    k1, k2 = jax.random.split(key)
    x1, x2 = aug(k1, x), aug(k2, x)
    f1, f2 = feats(params, x1), feats(params, x2)
    sup = losses.supervised_contrastive_loss(
        jnp.stack([proj(params, f1), proj(params, f2)], 1), y, temperature=0.2
    )
    pro = losses.prototype_loss(jnp.concatenate([f1, f2]), jnp.concatenate([y, y]), params["w"])
    # old task 0 only (classes 0-1): one group over its two prototypes
    both = jnp.concatenate([x1, x2])
    dis = losses.relation_distillation(
        feats(params, both), feats(teacher, both), params["w"][:2], teacher["w"][:2]
    )
    np.testing.assert_allclose(float(total), float(sup + 4 * pro + 4 * dis), rtol=1e-5)
    assert float(aux["distill"]) > 0
    # before the first snapshot the distillation is off
    off, _ = prd.loss(params, batch, None, mstate._replace(active=jnp.zeros(())), None)
    np.testing.assert_allclose(float(off), float(sup + 4 * pro), rtol=1e-5)


def test_prd_trains_through_the_runner_and_snapshots_the_teacher():
    tasks = _tasks(dim=4)
    rng = np.random.default_rng(0)
    params = {
        "enc": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "proj": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    prd, feats, _, _ = _prd()
    res = cl.run_sequence(
        tasks,
        apply_fn=lambda p, x: feats(p, x) @ p["w"].T,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=3,
        batch_size=4,
        methods=prd,
        scenario="class",
        task_loss=cl.no_task_loss,
    )
    st = res.state.methods["prd"]
    assert float(st.active) == 1.0
    for a, b in zip(jax.tree.leaves(st.teacher), jax.tree.leaves(res.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(res.state.params["enc"]), np.asarray(params["enc"]))


def test_prd_bad_inputs():
    f = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match=r"prd: temperature=nan"):
        cl.prd(f, f, f, f, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"prd: distill_weight=inf"):
        cl.prd(f, f, f, f, distill_weight=float("inf"))
    with pytest.raises(ValueError, match=r"prd: groups"):
        cl.prd(f, f, f, f, groups=[0.5, 1.0])
