"""The contract every cljax method passes, as one table (after optax's ``alias_test.py``).

Each row of ``METHODS`` builds a tiny problem for one method: a pure function and its
arguments, each argument with a role saying how it is placed on a mesh:

* ``params``: a parameter-shaped tree (replicated under data parallelism, FSDP-sharded);
* ``stacked``: T = 2 parameter-shaped trees stacked on a leading axis (sharded like the
  params, or on the task axis with each task vector FSDP-sharded over the other axis);
* ``state``: a :class:`cljax.train.TrainState` (params, optimizer and method states);
* ``batch``: examples, split over the ``data`` axis;
* ``replicated``: small things every device holds (coefficients, keys, scalars).

For every row the table checks: the function is jit-able (it compiles from abstract shapes);
it keeps the structure and dtypes of its inputs, in bfloat16 too; a stacked argument may
equally be a list of trees; and on the 8 simulated devices it gives the unsharded result
within float tolerance under FSDP, under data parallelism (rows with a batch) and with
stacked inputs sharded on their task axis (rows with stacked inputs). Rows with
``fsdp_forbids`` also check that the compiled FSDP program holds none of those collectives
(no all-gather of whole parameters where element-wise work needs none).

To add a method: write a ``_case_<name>(rng, dtype) -> Case`` builder and add a ``Method``
row to ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import averaging, losses, merging, mtl, projection
from cljax import sharding as cs
from cljax import tree as ct
from cljax.merging import atlas
from cljax.train import TrainState, make_step

T = 2  # stacked trees (few: compile time grows with T for the per-task methods)
MESH_SPEC = {"data": 8}  # data parallelism and FSDP over all 8 devices
TASK_MESH_SPEC = {"data": 2, "model": 4}  # one task vector per data row, FSDP over "model"


class Case(NamedTuple):
    """One method on one tiny problem.

    Attributes:
      fn: the pure function under test.
      args: its positional arguments (pytrees).
      roles: one role per argument (see the module docstring).
      like: ``like(args, out) -> (expected, got)``: the trees whose structure and dtypes
        must agree (by default the first ``params``/``state``/``stacked`` argument and the
        output).
      canon: maps an output to what must agree across shardings, where the output holds
        quantities defined up to a symmetry (the signs of singular vectors).
    """

    fn: Callable[..., Any]
    args: tuple
    roles: tuple[str, ...]
    like: Callable[[tuple, Any], tuple[Any, Any]] | None = None
    canon: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[np.random.Generator, Any], Case]
    dtypes: tuple = (jnp.float32, jnp.bfloat16)
    # collective kinds the FSDP-sharded program must not hold (None: not checked)
    fsdp_forbids: tuple[str, ...] | None = None
    # largest all-gather (result bytes) the FSDP program may hold: for methods that gather a
    # bounded sample by design (the TIES threshold search), never whole parameters
    fsdp_gather_limit: int | None = None
    # also check a listed (unstacked) input and the task-axis layout; off for rows whose
    # stacked input goes through the same code path as a row that checks them, to keep
    # the table fast (every check is one more compile)
    lists: bool = True
    task_axis: bool = True


# ----------------------------------------------------------------------------- tiny problems


def _params(rng: np.random.Generator, dtype: Any, scale: float = 1.0) -> dict:
    """Leaves whose dims the 8-way axis divides (sharded by FSDP) and one it does not."""
    shapes = {"dense": {"kernel": (16, 32), "bias": (32,)}, "head": {"kernel": (32, 8)}, "ln": (3,)}
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), dtype),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def _stacked(rng, dtype, scale=0.1):
    return ct.stack([_params(rng, dtype, scale) for _ in range(T)])


def _batch(rng, n=16):
    return {
        "x": jnp.asarray(rng.normal(size=(n, 16)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 8, size=n), jnp.int32),
    }


def _logits(p, x):
    h = jnp.tanh(x.astype(p["dense"]["kernel"].dtype) @ p["dense"]["kernel"] + p["dense"]["bias"])
    bias3 = jnp.pad(p["ln"], (0, 5)).astype(jnp.float32)  # a bias on 3 of the 8 classes
    return (h @ p["head"]["kernel"]).astype(jnp.float32) + bias3


def _ce(p, batch, rng=None):
    logp = jax.nn.log_softmax(_logits(p, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


# ----------------------------------------------------------------------------- merging


def _case_task_vector(rng, dtype):
    pre = _params(rng, dtype)
    ft = jax.tree.map(lambda x: x + jnp.asarray(0.1, dtype), pre)
    return Case(merging.task_vector, (ft, pre), ("params", "params"))


def _case_apply(rng, dtype):
    return Case(
        lambda p, t: merging.apply(p, t, -0.5),
        (_params(rng, dtype), _params(rng, dtype, 0.1)),
        ("params", "params"),
    )


def _case_task_arithmetic(rng, dtype):
    return Case(
        lambda p, tv: merging.task_arithmetic(p, tv, 0.3),
        (_params(rng, dtype), _stacked(rng, dtype)),
        ("params", "stacked"),
    )


def _case_ties(rng, dtype):
    return Case(
        lambda p, tv: merging.ties(p, tv, density=0.3, scale=1.0),
        (_params(rng, dtype), _stacked(rng, dtype)),
        ("params", "stacked"),
    )


_BIG = {"dense": {"kernel": (256, 128), "bias": (128,)}}  # more entries than the TIES sample


def _big_params(rng, dtype, scale=1.0):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), dtype),
        _BIG,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def _case_ties_leaf(rng, dtype):
    return Case(
        lambda p, tv: merging.ties(p, tv, density=0.3, merge="sum", scope="leaf"),
        (_big_params(rng, dtype), ct.stack([_big_params(rng, dtype, 0.1) for _ in range(T)])),
        ("params", "stacked"),
    )


def _case_dare(rng, dtype):
    return Case(
        lambda tv, key: merging.dare(tv, drop_rate=0.5, key=key),
        (_stacked(rng, dtype), jax.random.key(3)),
        ("stacked", "replicated"),
        like=lambda args, out: (args[0], out),
    )


def _case_average(rng, dtype):
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=T), jnp.float32)
    return Case(
        lambda models, w: merging.average(models, w),
        (_stacked(rng, dtype, 1.0), w),
        ("stacked", "replicated"),
        like=lambda args, out: (jax.tree.map(lambda x: x[0], args[0]), out),
    )


def _case_interpolate(rng, dtype):
    return Case(
        lambda a, b: merging.interpolate(a, b, 0.25),
        (_params(rng, dtype), _params(rng, dtype)),
        ("params", "params"),
    )


# ----------------------------------------------------------------------------- aTLAS


def _case_atlas_compose(rng, dtype):
    pre, tvs = _params(rng, dtype), _stacked(rng, dtype)
    coefs = jax.tree.map(lambda c: c + 0.1, atlas.init(pre, tvs))
    return Case(atlas.compose, (pre, tvs, coefs), ("params", "stacked", "replicated"))


def _case_atlas_step(rng, dtype):
    """One coefficient update: model and task vectors sharded, coefficients replicated."""
    pre, tvs = _params(rng, dtype), _stacked(rng, dtype)
    coefs = jax.tree.map(lambda c: c + 0.1, atlas.init(pre, tvs))
    tx = optax.sgd(0.5)  # (Adam's first step is sign(g): too sensitive to rounding)

    def step(coefs, opt_state, pre, tvs, batch):
        loss, g = jax.value_and_grad(lambda c: _ce(atlas.compose(pre, tvs, c), batch))(coefs)
        updates, opt_state = tx.update(g, opt_state, coefs)
        return optax.apply_updates(coefs, updates), opt_state, loss

    return Case(
        step,
        (coefs, tx.init(coefs), pre, tvs, _batch(rng)),
        ("replicated", "replicated", "params", "stacked", "batch"),
        like=lambda args, out: ((args[0], args[1]), out[:2]),
    )


# ----------------------------------------------------------------------------- averaging


def _averaging_step(averagers: dict, rng, dtype) -> Case:
    params = _params(rng, dtype)
    state = TrainState.create(
        params, optax.sgd(0.1), key=0, methods=averaging.init_averages(averagers, params)
    )
    step = make_step(_ce, post_update=averaging.averaging_hook(averagers), jit=False)
    return Case(step, (state, _batch(rng)), ("state", "batch"), like=lambda a, o: (a[0], o[0]))


def _case_ema(rng, dtype):
    return _averaging_step({"ema": averaging.ema(decay=0.9, debias=True)}, rng, dtype)


def _case_swa(rng, dtype):
    return _averaging_step({"swa": averaging.swa(start=0)}, rng, dtype)


def _case_weight_ensemble(rng, dtype):
    return _averaging_step({"we": averaging.weight_ensemble(every=1)}, rng, dtype)


# ----------------------------------------------------------------------------- losses


def _case_entropy_loss(rng, dtype):
    return Case(
        losses.entropy_loss,
        (jnp.asarray(rng.normal(size=(16, 8)), dtype),),
        ("batch",),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


def _case_kd_loss(rng, dtype):
    s, t = (jnp.asarray(rng.normal(size=(16, 8)), dtype) for _ in range(2))
    return Case(
        losses.kd_loss,
        (s, t),
        ("batch", "batch"),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


def _case_zscl_distillation(rng, dtype):
    s, t = (jnp.asarray(rng.normal(size=(16, 8)), dtype) for _ in range(2))
    ref = jnp.asarray(rng.normal(size=(8, 8)), dtype)
    return Case(
        lambda s, t, r: losses.zscl_distillation(s, t, r)[0],
        (s, t, ref),
        ("batch", "batch", "replicated"),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


# ----------------------------------------------------------------------------- continual learning

_TARGETS = [(r"dense/kernel", True)]


def _projection_step(tx: optax.GradientTransformation, hook, rng, dtype, canon=None) -> Case:
    """A train step whose optimizer ends in a projection with a non-empty memory."""
    params = _params(rng, dtype)
    state = TrainState.create(params, tx, key=0)
    state = state.replace(opt_state=hook(state.opt_state, params, rng))
    step = make_step(_ce, jit=False)
    return Case(
        step, (state, _batch(rng)), ("state", "batch"), like=lambda a, o: (a[0], o[0]), canon=canon
    )


def _coso_canon(out):
    """CoSO's bases are singular vectors (signs arbitrary): compare their projectors."""
    gram = lambda ms: tuple(m @ m.T for m in ms)

    def canon(s):
        return s._replace(
            projector=gram(s.projector),
            sketch=gram(s.sketch),
            history=gram(s.history),
            mu=tuple(m @ p.T for m, p in zip(s.mu, s.projector, strict=True)),
        )

    state, metrics = out
    opt = projection.map_state(state.opt_state, projection.CoSOState, canon)
    return state.replace(opt_state=opt), metrics


def _case_gpm(rng, dtype):
    def hook(opt_state, params, rng):
        reps = [rng.normal(size=(12, 16)) @ np.diag([4.0] * 4 + [0.01] * 12)]
        return projection.map_state(
            opt_state,
            projection.GPMState,
            lambda s: projection.gpm_next_task(s, reps, threshold=0.97),
        )

    tx = optax.chain(optax.adam(1e-2), projection.gpm(_TARGETS, freeze_1d=True))
    return _projection_step(tx, hook, rng, dtype)


def _case_osft(rng, dtype):
    def hook(opt_state, params, rng):
        weights = projection.target_leaves(params, _TARGETS)
        return projection.map_state(
            opt_state,
            projection.OSFTState,
            lambda s: projection.osft_next_task(s, weights, ratios=0.5),
        )

    tx = optax.chain(optax.adam(1e-2), projection.osft(_TARGETS))
    return _projection_step(tx, hook, rng, dtype)


def _case_coso(rng, dtype):
    not_targets = lambda p: ct.rule_mask(p, [(r"dense/kernel", False)], default=True)
    tx = optax.chain(
        optax.masked(optax.adam(1e-2), not_targets),
        projection.coso(1e-2, _TARGETS, proj_rank=2, sketch_rank=4),
    )
    return _projection_step(tx, lambda o, p, r: o, rng, dtype, canon=_coso_canon)


def _case_l2_anchor(rng, dtype):
    return Case(
        losses.l2_anchor,
        (_params(rng, dtype), _params(rng, dtype)),
        ("params", "params"),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


def _case_ewc_penalty(rng, dtype):
    params = _params(rng, dtype)
    fisher = jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), _params(rng, dtype))
    ewc = losses.ewc_next_task(None, _params(rng, dtype), fisher)
    return Case(
        lambda p, s: losses.ewc_penalty(p, s, weight=10.0),
        (params, ewc),
        ("params", "params"),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


def _case_diagonal_fisher(rng, dtype):
    nll = lambda p, ex: _ce(p, jax.tree.map(lambda x: x[None], ex))
    return Case(
        lambda p, b: losses.diagonal_fisher(nll, p, b),
        (_params(rng, dtype), _batch(rng)),
        ("params", "batch"),
        like=lambda a, o: (jax.tree.map(lambda x: x.astype(jnp.float32), a[0]), o),
    )


def _case_lwf_distillation(rng, dtype):
    s, t = (jnp.asarray(rng.normal(size=(16, 8)), dtype) for _ in range(2))
    return Case(
        losses.lwf_distillation,
        (s, t),
        ("batch", "batch"),
        like=lambda a, o: (jnp.zeros((), jnp.float32), o),
    )


# ----------------------------------------------------------------------------- multi-task learning


def _aggregator(agg, needs_key: bool = False):
    def build(rng, dtype):
        grads = _stacked(rng, dtype, 1.0)
        one = lambda a, o: (jax.tree.map(lambda x: x[0], a[0]), o)
        if needs_key:
            return Case(
                lambda g, k: agg(g, key=k),
                (grads, jax.random.key(1)),
                ("stacked", "replicated"),
                one,
            )
        return Case(agg, (grads,), ("stacked",), one)

    return build


def _task_losses(p, batch, rng=None):
    """Two tasks: the classes 0-3 and 4-7 of the tiny classifier, cross-entropy each."""
    logits = _logits(p, batch["x"])
    y = batch["y"] % 4
    ce = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
    return jnp.stack([ce(logits[:, :4]), ce(logits[:, 4:])])


def _mtl_grad(grad_fn):
    def build(rng, dtype):
        return Case(
            lambda p, b: grad_fn(p, b),
            (_params(rng, dtype), _batch(rng)),
            ("params", "batch"),
            like=lambda a, o: (a[0], o[0]),
        )

    return build


# ----------------------------------------------------------------------------- the table


METHODS: list[Method] = [
    Method("task_vector", _case_task_vector, fsdp_forbids=("all-gather", "all-reduce")),
    Method("apply", _case_apply, fsdp_forbids=("all-gather", "all-reduce")),
    Method("task_arithmetic", _case_task_arithmetic, fsdp_forbids=("all-gather",)),
    Method("ties", _case_ties),
    # the threshold search gathers a strided sample of 2**14 entries per task and leaf
    Method("ties_leaf", _case_ties_leaf, fsdp_gather_limit=T * (1 << 14) * 4, lists=False),
    Method("dare", _case_dare, fsdp_forbids=("all-gather",), lists=False),
    Method("average", _case_average, fsdp_forbids=("all-gather",)),
    Method("interpolate", _case_interpolate, fsdp_forbids=("all-gather", "all-reduce")),
    Method("atlas_compose", _case_atlas_compose, fsdp_forbids=("all-gather",)),
    Method("atlas_step", _case_atlas_step),
    Method("ema", _case_ema),
    Method("swa", _case_swa),
    Method("weight_ensemble", _case_weight_ensemble),
    Method("entropy_loss", _case_entropy_loss),
    Method("kd_loss", _case_kd_loss),
    Method("zscl_distillation", _case_zscl_distillation),
    Method("gpm", _case_gpm),
    Method("osft", _case_osft),
    Method("coso", _case_coso),
    Method("l2_anchor", _case_l2_anchor),
    Method("ewc_penalty", _case_ewc_penalty),
    Method("diagonal_fisher", _case_diagonal_fisher),
    Method("lwf_distillation", _case_lwf_distillation),
    Method("linear", _aggregator(mtl.linear), fsdp_forbids=("all-gather",)),
    Method("mgda", _aggregator(mtl.mgda), task_axis=False),
    Method("pcgrad", _aggregator(mtl.pcgrad, needs_key=True)),
    Method("cagrad", _aggregator(mtl.cagrad), lists=False, task_axis=False),
    Method("imtl_g", _aggregator(mtl.imtl_g), lists=False, task_axis=False),
    Method("nash_mtl", _aggregator(mtl.nash_mtl), lists=False, task_axis=False),
    Method("aligned_mtl", _aggregator(mtl.aligned_mtl), lists=False, task_axis=False),
    Method("graddrop", _aggregator(mtl.graddrop, needs_key=True), lists=False),
    Method("mtl_grad_fn", _mtl_grad(mtl.mtl_grad_fn(_task_losses, mtl.mgda))),
    Method("fmtl", _mtl_grad(mtl.fmtl(_task_losses, mtl.linear, rho=0.05))),
]
NAMES = [m.name for m in METHODS]
BY_NAME = {m.name: m for m in METHODS}
# Rows whose cases compile slowly (a threshold search per leaf, CoSO's SVDs) run in the slow
# tier only; the fast tier (make test-fast) checks every other row, sharded under FSDP.
SLOW_ROWS = ("ties_leaf", "coso")


def _rows(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ROWS else n for n in names]


# ----------------------------------------------------------------------------- helpers


def _seed(name: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32(name.encode()))


@functools.cache
def _case(name: str, dtype_name: str = "float32") -> Case:
    return BY_NAME[name].build(_seed(name), jnp.dtype(dtype_name))


@functools.cache
def _compiled(name: str) -> Any:
    """The unsharded program, compiled from abstract shapes alone (the jit-ability check)."""
    case = _case(name)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), case.args)
    return jax.jit(case.fn).lower(*abstract).compile()


@functools.cache
def _reference(name: str) -> Any:
    case = _case(name)
    return _canon(case, _compiled(name)(*case.args))


def _canon(case: Case, out: Any) -> Any:
    return jax.device_get(case.canon(out) if case.canon else out)


def _like(case: Case, out: Any) -> tuple[Any, Any]:
    if case.like is not None:
        return case.like(case.args, out)
    i = next(i for i, r in enumerate(case.roles) if r in ("params", "state", "stacked"))
    return case.args[i], out


def _tol(dtype: Any) -> dict:
    return (
        {"rtol": 2e-2, "atol": 2e-2}
        if jnp.dtype(dtype) == jnp.bfloat16
        else {"rtol": 1e-5, "atol": 1e-5}
    )


def _close(got: Any, want: Any, **tol: float) -> None:
    def conv(x):
        x = jnp.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x.astype(jnp.float32) if ct.is_float(x) else x

    chex.assert_trees_all_close(jax.tree.map(conv, got), jax.tree.map(conv, want), **tol)


def _shardings(case: Case, mesh, mode: str) -> tuple:
    """The in-shardings of a case's arguments under ``mode`` (dp, fsdp or task)."""
    param_default = cs.REPLICATED if mode == "dp" else cs.FSDP
    fsdp_axis = "model" if mode == "task" else "data"
    out = []
    for arg, role in zip(case.args, case.roles, strict=True):
        if role in ("params", "state"):
            out.append(cs.named_shardings(arg, mesh, default=param_default, fsdp_axis=fsdp_axis))
        elif role == "stacked":
            task_axis = "data" if mode == "task" else None
            out.append(
                cs.stacked_shardings(
                    arg, mesh, task_axis=task_axis, default=param_default, fsdp_axis=fsdp_axis
                )
            )
        elif role == "batch":
            out.append(jax.tree.map(lambda _: cs.batch_sharding(mesh), arg))
        elif role == "replicated":
            out.append(jax.tree.map(lambda _: cs.replicated(mesh), arg))
        else:
            raise ValueError(f"unknown role {role!r}")
    return tuple(out)


@functools.cache
def _sharded(name: str, mode: str):
    """``(compiled, placed args, out shardings)`` of a case on the mesh of ``mode``."""
    case = _case(name)
    spec = TASK_MESH_SPEC if mode == "task" else MESH_SPEC
    mesh = cs.make_mesh(spec, jax.devices())
    in_sh = _shardings(case, mesh, mode)
    out_shape = jax.eval_shape(case.fn, *case.args)
    out_default = cs.REPLICATED if mode == "dp" else cs.FSDP
    fsdp_axis = "model" if mode == "task" else "data"
    out_sh = cs.named_shardings(out_shape, mesh, default=out_default, fsdp_axis=fsdp_axis)
    args = jax.device_put(case.args, in_sh)
    fn = jax.jit(case.fn, in_shardings=in_sh, out_shardings=out_sh)
    return fn.lower(*args).compile(), args, out_sh


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", _rows(NAMES))
def test_jit_from_shapes_alone(name):
    """Jit-able: compiles from abstract shapes (no concrete value is read while tracing)."""
    out = _reference(name)
    for leaf in jax.tree.leaves(out):
        if ct.is_float(leaf):
            assert np.isfinite(np.asarray(leaf, np.float32)).all(), name


@pytest.mark.parametrize("name", _rows(NAMES))
def test_keeps_structure_and_dtypes(name):
    for dtype in BY_NAME[name].dtypes:
        case = _case(name, jnp.dtype(dtype).name)
        want, got = _like(case, jax.eval_shape(case.fn, *case.args))
        chex.assert_trees_all_equal_shapes_and_dtypes(got, want)


@pytest.mark.parametrize(
    "name", _rows([m.name for m in METHODS if m.lists and "stacked" in _case(m.name).roles])
)
def test_stacked_and_list_agree(name):
    case = _case(name)
    listed = tuple(
        ct.unstack(a) if r == "stacked" else a for a, r in zip(case.args, case.roles, strict=True)
    )
    _close(_canon(case, jax.jit(case.fn)(*listed)), _reference(name), **_tol(jnp.float32))


def _modes(name: str) -> list[str]:
    roles = _case(name).roles
    task = BY_NAME[name].task_axis and "stacked" in roles
    return ["fsdp"] + ["dp"] * ("batch" in roles) + ["task"] * task


@pytest.mark.parametrize(
    "name, mode",
    [
        pytest.param(n, m, marks=pytest.mark.slow) if m != "fsdp" or n in SLOW_ROWS else (n, m)
        for n in NAMES
        for m in _modes(n)
    ],
)
def test_sharded_equals_unsharded(name, mode):
    compiled, args, out_sh = _sharded(name, mode)
    out = compiled(*args)
    _close(_canon(_case(name), out), _reference(name), rtol=2e-5, atol=2e-5)
    # outputs come back with the shardings asked for (method states sharded like params)
    for leaf, s in zip(jax.tree.leaves(out), jax.tree.leaves(out_sh), strict=True):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (name, mode, leaf.shape)


@pytest.mark.parametrize(
    "name", _rows([m.name for m in METHODS if m.fsdp_forbids is not None or m.fsdp_gather_limit])
)
def test_fsdp_compiles_without_gathering_parameters(name):
    compiled, args, _ = _sharded(name, "fsdp")
    colls = cs.hlo_collectives(compiled)
    method = BY_NAME[name]
    if method.fsdp_forbids is not None:
        found = {c.kind for c in colls} & set(method.fsdp_forbids)
        assert not found, f"{name} under FSDP holds {found}: {colls}"
    if method.fsdp_gather_limit:
        largest = max(x.nbytes for x in jax.tree.leaves(args) if hasattr(x, "nbytes"))
        assert method.fsdp_gather_limit < largest, (
            "the limit must be able to catch a whole-parameter gather"
        )
        big = [
            c for c in colls if c.kind == "all-gather" and c.result_bytes > method.fsdp_gather_limit
        ]
        assert not big, f"{name} under FSDP gathers more than its sample: {big}"


def test_averages_are_sharded_like_params():
    compiled, args, _ = _sharded("ema", "fsdp")
    state, _ = compiled(*args)
    p = state.params["dense"]["kernel"].sharding
    assert p.spec == jax.sharding.PartitionSpec(None, "data")
    assert state.methods["ema"].mean["dense"]["kernel"].sharding.is_equivalent_to(p, 2)


@pytest.mark.slow
def test_dp_atlas_step_reduces_coefficient_gradients_only():
    """Data-parallel aTLAS: plain jit all-reduces dL/dθ; the local form only the coefficients'."""
    compiled, args, _ = _sharded("atlas_step", "dp")
    coefs, _, pre, tvs, batch = args
    n_coef = sum(x.size for x in jax.tree.leaves(coefs))
    n_params = sum(x.size for x in jax.tree.leaves(pre))
    plain = sum(c.result_bytes for c in cs.hlo_collectives(compiled) if c.kind == "all-reduce")
    assert plain >= 4 * n_params  # the parameter cotangent crosses the wire

    mesh = cs.make_mesh(MESH_SPEC, jax.devices())
    vg = cs.data_parallel_value_and_grad(lambda c, b, p, t: _ce(atlas.compose(p, t, c), b), mesh)
    rep, bsh = cs.replicated(mesh), cs.batch_sharding(mesh)
    f = jax.jit(vg, in_shardings=(rep, bsh, rep, rep), out_shardings=rep)
    local = f.lower(coefs, batch, pre, tvs).compile()
    reduced = sum(c.result_bytes for c in cs.hlo_collectives(local))
    assert reduced <= 4 * (n_coef + 1)  # the coefficients' gradient and the loss
    want = jax.jit(jax.value_and_grad(lambda c: _ce(atlas.compose(pre, tvs, c), batch)))(coefs)
    _close(local(coefs, batch, pre, tvs), want, rtol=1e-5, atol=1e-6)
