import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax.mtl as mtl

RULES = [(r"^head_\d+/", True)]


def model(rng, t=3):
    params = {"trunk": {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}}
    for i in range(t):
        params[f"head_{i}"] = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}

    def loss_fn(p, batch):
        f = jnp.tanh(batch @ p["trunk"]["w"])
        return jnp.stack([jnp.mean((f @ p[f"head_{i}"]["w"] - i) ** 2) for i in range(t)])

    return params, loss_fn


def reference(loss_fn, params, x, agg, rho, adaptive, normalization, key=None):
    """F-MTL as a Python loop over tasks, from jax.grad of each scalar task loss."""
    t = len(loss_fn(params, x))
    head = lambda k: k.startswith("head_")
    g, g_sam, heads = [], [], {}
    for i in range(t):
        gi = jax.grad(lambda p, i=i: loss_fn(p, x)[i])(params)
        a2 = lambda k, v: (params[k]["w"] ** 2 if adaptive else 1.0) * v
        a1 = lambda k, v: (jnp.abs(params[k]["w"]) if adaptive else 1.0) * v
        sq = {k: jnp.sum(a1(k, v["w"]) ** 2) for k, v in gi.items()}
        n_sh = jnp.sqrt(sum(v for k, v in sq.items() if not head(k)))
        n_hd = jnp.sqrt(sum(v for k, v in sq.items() if head(k)))
        if normalization == "joint":
            n_sh = n_hd = jnp.sqrt(n_sh**2 + n_hd**2)
        pert = {
            k: {"w": params[k]["w"] + rho * a2(k, gi[k]["w"]) / (n_hd if head(k) else n_sh)}
            for k in params
        }
        gs = jax.grad(lambda p, i=i: loss_fn(p, x)[i])(pert)
        g.append(gi["trunk"])
        g_sam.append(gs["trunk"])
        heads[f"head_{i}"] = gs[f"head_{i}"]
        for j in range(t):  # other heads untouched: no perturbation, no gradient
            if j != i:
                np.testing.assert_array_equal(pert[f"head_{j}"]["w"], params[f"head_{j}"]["w"])
    g = {"trunk": jax.tree.map(lambda *a: jnp.stack(a), *g)}
    g_sam = {"trunk": jax.tree.map(lambda *a: jnp.stack(a), *g_sam)}
    h = jax.tree.map(lambda a, b: a - b, g_sam, g)
    kg, kh = (None, None) if key is None else jax.random.split(key)
    shared = jax.tree.map(lambda a, b: a + b, agg(g, key=kg), agg(h, key=kh))
    return {**shared, **heads}, g


@pytest.mark.slow
@pytest.mark.parametrize(
    "agg,adaptive,normalization",
    [
        (mtl.linear, False, "joint"),
        (mtl.mgda, True, "separate"),
        (functools.partial(mtl.cagrad, c=0.4), False, "separate"),
        (mtl.imtl_g, True, "joint"),
    ],
)
def test_matches_loop_reference(rng, agg, adaptive, normalization):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    rho = 0.3
    grad_fn = mtl.fmtl(
        loss_fn, agg, rho=rho, adaptive=adaptive, normalization=normalization, head_rules=RULES
    )
    out, info = jax.jit(grad_fn)(params, x)
    ref, _ = reference(loss_fn, params, x, agg, rho, adaptive, normalization)
    chex.assert_trees_all_close(out, ref, rtol=2e-4, atol=2e-5)
    # each task was evaluated at its own perturbed point: sharper than the clean loss
    assert np.all(np.asarray(info["sam_losses"]) > np.asarray(info["losses"]))


@pytest.mark.slow
def test_pcgrad_key_and_scan(rng):
    params, loss_fn = model(rng, 2)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    key = jax.random.key(5)
    kw = dict(rho=0.1, head_rules=RULES)
    out = mtl.fmtl(loss_fn, mtl.pcgrad, **kw)(params, x, key=key)
    scanned = mtl.fmtl(loss_fn, mtl.pcgrad, task_batch_size=1, **kw)(params, x, key=key)
    unrolled = mtl.fmtl(loss_fn, mtl.pcgrad, task_batch_size=1, unroll=True, **kw)
    ref, _ = reference(loss_fn, params, x, mtl.pcgrad, 0.1, False, "joint", key=key)
    chex.assert_trees_all_close(out[0], ref, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(scanned[0], ref, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(unrolled(params, x, key=key)[0], ref, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_unroll_gives_plain_convolutions_and_no_loop():
    # The mechanism behind unroll=True (README, mtl_bench): vmap over per-task weights turns
    # the second convolution into a grouped one, lax.map makes a loop; unrolled, neither.
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(4, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x))).reshape(x.shape[0], -1)
            return [nn.Dense(3, name=f"head_{i}")(h) for i in range(2)]

    net = Net()
    x, y = jnp.ones((2, 6, 6, 1)), jnp.zeros((2, 2), jnp.int32)
    params = net.init(jax.random.key(0), x)["params"]
    loss_fn = lambda p, b: mtl.classification_losses(net.apply({"params": p}, b[0]), b[1])

    def hlo(**kw):
        grad_fn = mtl.fmtl(loss_fn, rho=0.1, head_rules=mtl.HEAD_RULES, **kw)
        text = jax.jit(grad_fn).lower(params, (x, y)).as_text()
        groups = {int(g) for g in re.findall(r"(?:feature|batch)_group_count = (\d+)", text)}
        return "while" in text, groups

    assert hlo() == (False, {1, 2})
    assert hlo(task_batch_size=1) == (True, {1})
    assert hlo(task_batch_size=1, unroll=True) == (False, {1})


@pytest.mark.slow
@pytest.mark.parametrize("agg", [mtl.linear, mtl.mgda, mtl.cagrad, mtl.nash_mtl, mtl.aligned_mtl])
def test_rho_zero_is_the_base_aggregator(rng, agg):
    params, loss_fn = model(rng)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    out, _ = mtl.fmtl(loss_fn, agg, rho=0.0, head_rules=RULES)(params, x)
    base, _ = mtl.mtl_grad_fn(loss_fn, agg, head_rules=RULES)(params, x)
    chex.assert_trees_all_close(out, base, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_perturbations_differ_by_task(rng):
    params, loss_fn = model(rng, 2)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    _, g = reference(loss_fn, params, x, mtl.linear, 0.3, False, "joint")
    g0, g1 = np.asarray(g["trunk"]["w"][0]), np.asarray(g["trunk"]["w"][1])
    cos = (g0 * g1).sum() / np.linalg.norm(g0) / np.linalg.norm(g1)
    assert cos < 0.99
    # One shared perturbation (of the summed loss) would give another gradient.
    out, _ = mtl.fmtl(loss_fn, mtl.linear, rho=0.3, head_rules=RULES)(params, x)
    shared_sam = jax.grad(lambda p: loss_fn(p, x).mean())
    gsum = shared_sam(params)
    e = jax.tree.map(
        lambda v: 0.3 * v / jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree.leaves(gsum))), gsum
    )
    joint = shared_sam(jax.tree.map(jnp.add, params, e))
    assert not np.allclose(out["trunk"]["w"], joint["trunk"]["w"], rtol=1e-3)


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4, name="trunk_dense")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="trunk_bn")(x)
        return [nn.Dense(1, name=f"head_{i}")(x)[:, 0] for i in range(2)]


@pytest.mark.slow
def test_batch_stats_update_on_the_clean_pass_only(rng):
    net = _BNNet()
    x = jnp.asarray(rng.normal(size=(16, 3)) * 3 + 1, jnp.float32)
    variables = net.init(jax.random.key(0), x, train=False)

    def loss_fn(params, batch, batch_stats):
        out, new = net.apply(
            {"params": params, "batch_stats": batch_stats},
            batch,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.stack([jnp.mean((o - i) ** 2) for i, o in enumerate(out)]), new["batch_stats"]

    grad_fn = mtl.fmtl(loss_fn, mtl.mgda, rho=0.5, head_rules=mtl.HEAD_RULES, has_aux=True)
    _, info = jax.jit(grad_fn)(variables["params"], x, variables["batch_stats"])
    _, clean = loss_fn(variables["params"], x, variables["batch_stats"])
    chex.assert_trees_all_close(info["aux"], clean, rtol=1e-6)


@pytest.mark.slow
def test_bad_inputs(rng):
    params, loss_fn = model(rng, 2)
    with pytest.raises(ValueError, match="fmtl: rho=-0.5 must be >= 0"):
        mtl.fmtl(loss_fn, mtl.mgda, rho=-0.5)
    with pytest.raises(ValueError, match="normalization='both'"):
        mtl.fmtl(loss_fn, mtl.mgda, rho=0.5, normalization="both")
    t1_loss = lambda p, b: loss_fn(p, b)[:1]
    with pytest.raises(ValueError, match="mgda: got T=1"):
        mtl.fmtl(t1_loss, mtl.mgda, rho=0.5, head_rules=RULES)(params, jnp.ones((2, 4)))
