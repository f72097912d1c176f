"""Every family on a ``flax.nnx`` model: merging, aTLAS, an MTL aggregator, a projection, an
average. Params go in and out of the module with ``nnx.split`` / ``nnx.merge`` /
``nnx.update`` and ``nnx.Optimizer``; each result is checked against the same method run on
the linen-style dict of the same arrays (``nnx.to_pure_dict``) or against a hand-worked
reference.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cljax import averaging as av
from cljax import merging, mtl
from cljax import projection as pj
from cljax import tree as ct
from cljax.merging import atlas

as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # flax >= 0.12 renamed it

RTOL = 1e-6  # float32


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _setup(seed=0, tasks=3):
    model = MLP(nnx.Rngs(seed))
    graphdef, live = nnx.split(model, nnx.Param)
    # nnx.split's State holds the module's own Variables: nnx.update(model, ...) would change
    # it too. A tree map gives new Variables, a snapshot of θ0.
    theta0 = jax.tree.map(jnp.copy, live)
    rng = np.random.default_rng(seed)
    taus = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), theta0)
        for _ in range(tasks)
    ]
    return model, graphdef, theta0, taus


def _pure(tree):
    """The linen-style nested dict of the same arrays."""
    if hasattr(nnx, "to_pure_dict"):
        return nnx.to_pure_dict(tree)
    return tree.to_pure_dict()


@pytest.mark.slow
def test_paths_match_linen_style():
    _, _, theta0, _ = _setup()
    assert ct.paths(theta0) == ct.paths(_pure(theta0))
    assert ct.paths(theta0) == [
        "head/bias",
        "head/kernel",
        "l1/bias",
        "l1/kernel",
        "l2/bias",
        "l2/kernel",
    ]


@pytest.mark.slow
def test_task_arithmetic_with_a_rule_and_ties():
    model, graphdef, theta0, taus = _setup()
    rules = [(r"^head/", False), (r"kernel$", True), (r".*", False)]
    merged = merging.task_arithmetic(theta0, taus, 0.5, rules=rules)
    assert isinstance(merged, nnx.State)
    # Hand-worked: the body kernels move by 0.5 * sum(taus); heads and biases stay at θ0.
    for path, x in ct.leaves_with_paths(merged):
        x0 = dict(ct.leaves_with_paths(theta0))[path]
        if path in ("l1/kernel", "l2/kernel"):
            want = x0 + 0.5 * sum(dict(ct.leaves_with_paths(t))[path] for t in taus)
        else:
            want = x0
        np.testing.assert_allclose(x, want, rtol=RTOL, atol=1e-7, err_msg=path)
    assert float(jnp.abs(merged["l1"]["kernel"][...] - theta0["l1"]["kernel"][...]).max()) > 0
    # The same rules on the linen-style dict give the same merge.
    ref = merging.task_arithmetic(_pure(theta0), [_pure(t) for t in taus], 0.5, rules=rules)
    chex.assert_trees_all_close(_pure(merged), ref, rtol=RTOL)
    # Back into the module.
    nnx.update(model, merged)
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(model(x), nnx.merge(graphdef, merged)(x), rtol=RTOL)

    tied = merging.ties(theta0, taus, density=0.5, rules=rules)
    ref = merging.ties(_pure(theta0), [_pure(t) for t in taus], density=0.5, rules=rules)
    chex.assert_trees_all_close(_pure(tied), ref, rtol=RTOL)
    # A rule written for the raw flax paths ('.../value') is an error, not a silent no-op.
    with pytest.raises(ValueError, match=r"'kernel/value\$'.*selects no leaf.*'head/bias'"):
        merging.task_arithmetic(theta0, taus, 0.5, rules=[(r"kernel/value$", True)])


@pytest.mark.slow
def test_atlas_compose_and_gradient():
    _, graphdef, theta0, taus = _setup()
    spec = atlas.blocks(theta0, exclude=[r"^head/"])
    assert "l1/kernel" in spec.names and not any(n.startswith("head") for n in spec.names)
    coefs = atlas.init(theta0, taus, spec)
    coefs = jax.tree.map(lambda c: c + jnp.arange(c.shape[0], dtype=c.dtype) * 0.3, coefs)
    out = atlas.compose(theta0, taus, coefs, spec)
    # Hand-worked: θ0 + Σ_t c[block][t] τ_t on every composed block.
    c = dict(ct.leaves_with_paths(coefs))
    for path, x in ct.leaves_with_paths(out):
        x0 = dict(ct.leaves_with_paths(theta0))[path]
        want = x0
        if not path.startswith("head/"):
            want = x0 + sum(
                c[path][t] * dict(ct.leaves_with_paths(taus[t]))[path] for t in range(3)
            )
        np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6, err_msg=path)
    ref = atlas.compose(
        _pure(theta0),
        [_pure(t) for t in taus],
        coefs,
        atlas.blocks(_pure(theta0), exclude=[r"^head/"]),
    )
    chex.assert_trees_all_close(_pure(out), ref, rtol=RTOL)

    x = jnp.ones((3, 4))

    def loss(coefs):
        return jnp.sum(nnx.merge(graphdef, atlas.compose(theta0, taus, coefs, spec))(x) ** 2)

    g = jax.jit(jax.grad(loss))(coefs)
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g["l1"]["kernel"]).sum()) > 0


@pytest.mark.slow
def test_pcgrad_on_per_task_gradients():
    _, graphdef, theta0, _ = _setup()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)

    def loss_fn(params, batch):
        y = nnx.merge(graphdef, params)(batch)
        return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1.0) ** 2)])

    rules = [(r"^head/", True)]
    tg = jax.jit(lambda p: mtl.per_task_grads(loss_fn, p, x, head_rules=rules))(theta0)
    assert ct.paths(tg.shared) == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
    g = mtl.pcgrad(tg.shared, key=jax.random.key(0))

    def pure_loss(params, batch):
        return loss_fn(nnx.State(params), batch)

    tg_ref = mtl.per_task_grads(pure_loss, _pure(theta0), x, head_rules=rules)
    g_ref = mtl.pcgrad(tg_ref.shared, key=jax.random.key(0))
    chex.assert_trees_all_close(_pure(g), g_ref, rtol=1e-5, atol=1e-7)
    # Two tasks, independent reference: PCGrad projects each gradient off the other when
    # they conflict, then sums.
    flat = lambda t: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)])
    g1, g2 = (flat(jax.tree.map(lambda v, i=i: v[i], tg.shared)) for i in range(2))
    dot = g1 @ g2
    p1 = g1 - jnp.minimum(dot, 0) / (g2 @ g2) * g2
    p2 = g2 - jnp.minimum(dot, 0) / (g1 @ g1) * g1
    np.testing.assert_allclose(flat(g), p1 + p2, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gpm_with_nnx_optimizer_protects_old_inputs():
    model = MLP(nnx.Rngs(0))
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(2, 4))
    x_old = jnp.asarray(rng.normal(size=(64, 2)) @ basis, jnp.float32)  # rank-2 inputs
    targets = [(r"kernel$", True)]
    opt = nnx.Optimizer(
        model, optax.chain(optax.adam(1e-2), pj.gpm(targets, freeze_1d=True)), wrt=nnx.Param
    )
    # Between-task hook: record the layer inputs on the live module, grow the memory.
    reps = pj.gpm_representations(
        nnx.state(model, nnx.Param), targets, pj.record_layer_inputs(model, x_old)
    )
    assert [r.shape for r in reps] == [(64, 8), (64, 4), (64, 8)]  # head, l1, l2
    new_state = pj.map_state(
        as_pure(opt.opt_state), pj.GPMState, lambda s: pj.gpm_next_task(s, reps, threshold=1.0)
    )
    nnx.update(opt.opt_state, nnx.state(new_state))
    (gs,) = pj.find_state(as_pure(opt.opt_state), pj.GPMState)
    assert int(gs.rank[1]) == 2 and int(gs.task) == 1  # l1 sees a 2-D input subspace

    before = model(x_old)
    x_new = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)

    @nnx.jit
    def train_step(model, opt, x):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        opt.update(model, grads)

    w0 = model.l1.kernel[...]
    for _ in range(5):
        train_step(model, opt, x_new)
    assert float(jnp.abs(model.l1.kernel[...] - w0).max()) > 1e-3  # it did learn
    np.testing.assert_allclose(model(x_old), before, atol=1e-4)


def test_ema_of_nnx_params():
    model, graphdef, theta0, taus = _setup()
    avg = av.ema(decay=0.5)
    state = avg.init(nnx.state(model, nnx.Param))
    ref = avg.init(_pure(theta0))
    for t in taus:  # the live module after each "step"
        nnx.update(model, jax.tree.map(jnp.add, theta0, t))
        _, state = jax.jit(avg.update)(nnx.state(model, nnx.Param), state, step=1)
        _, ref = avg.update(jax.tree.map(jnp.add, _pure(theta0), _pure(t)), ref, step=1)
    mean = av.average_params(state, nnx.state(model, nnx.Param))
    chex.assert_trees_all_close(_pure(mean), ref.mean, rtol=RTOL)
    # Hand-worked: three halvings, 1/8 of θ0 and 1/8, 1/4, 1/2 of the three fine-tunes.
    want = jax.tree.map(
        lambda a, b, c, d: a / 8 + (a + b) / 8 + (a + c) / 4 + (a + d) / 2, theta0, *taus
    )
    chex.assert_trees_all_close(_pure(mean), _pure(want), rtol=1e-5)
    nnx.update(model, mean)  # the average back into the module
    np.testing.assert_allclose(model.l1.kernel[...], mean["l1"]["kernel"][...], rtol=RTOL)


@pytest.mark.slow
def test_the_guide_runs():
    """The code block of docs/nnx.md, run as written."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "nnx.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], "docs/nnx.md", "exec"), scope)
    assert sorted(scope["recorded"]) == ["head/kernel", "l1/kernel"]
    gs = pj.find_state(as_pure(scope["opt"].opt_state), pj.GPMState)[0]
    assert int(gs.task) == 1 and all(int(r) > 0 for r in gs.rank)
    chex.assert_tree_all_finite(as_pure(scope["merged"]))
