"""Tests of cljax.sharding on 8 simulated CPU devices."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cljax import sharding as cs
from cljax.checkpoint import CheckpointManager
from cljax.train import TrainState, make_step

DEVICES = jax.devices()


def _params(rng, dtype=np.float32):
    return {
        "dense": {"kernel": rng.normal(size=(16, 32)).astype(dtype), "bias": np.zeros(32, dtype)},
        "head": {"kernel": rng.normal(size=(32, 4)).astype(dtype), "bias": np.zeros(4, dtype)},
    }


def _loss(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
    out = h @ params["head"]["kernel"] + params["head"]["bias"]
    return jnp.mean((out - batch["y"]) ** 2)


def _batch(rng, n=16):
    return {
        "x": rng.normal(size=(n, 16)).astype(np.float32),
        "y": rng.normal(size=(n, 4)).astype(np.float32),
    }


# ----------------------------------------------------------------------------- meshes


def test_make_mesh_specs():
    assert len(DEVICES) == 8
    m = cs.make_mesh({"data": -1}, DEVICES)
    assert dict(m.shape) == {"data": 8}
    m = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    assert dict(m.shape) == {"data": 4, "model": 2}
    assert m.axis_names == ("data", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    m = cs.make_mesh({"data": -1, "model": 2}, DEVICES[:4])
    assert dict(m.shape) == {"data": 2, "model": 2}
    assert set(m.devices.flat) == set(DEVICES[:4])


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"data": 3}, r"needs 3 devices, but 8 devices were given"),
        ({"data": 3, "model": -1}, r"do not divide by 3"),
        ({"data": -1, "model": -1}, r"more than one -1"),
        ({"data": 0}, r"'data' has size 0"),
        ({}, r"at least one axis"),
    ],
)
def test_make_mesh_bad_shapes(spec, match):
    with pytest.raises(ValueError, match=match):
        cs.make_mesh(spec, DEVICES)


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((6, 16), P(None, "data")),
        ((16, 16), P(None, "data")),  # ties go to the later (output) dimension
        ((64, 8), P("data", None)),
        ((3, 5), P()),  # nothing divisible: replicated
        ((8,), P("data")),
        ((), P()),
        ((4, 4), P()),  # smaller than the axis
    ],
)
def test_fsdp_spec_hand_cases(shape, expected):
    mesh = cs.make_mesh({"data": 8}, DEVICES)
    assert cs.fsdp_spec(shape, mesh) == expected


def test_fsdp_spec_min_size_and_axes():
    mesh = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    assert cs.fsdp_spec((8, 8), mesh, min_size=100) == P()
    assert cs.fsdp_spec((8, 8), mesh, ("data", "model")) == P(None, ("data", "model"))
    assert cs.fsdp_spec((12, 6), mesh, "model") == P("model", None)


def test_partition_rules_first_match_and_default(rng):
    mesh = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    params = _params(rng)
    rules = [(r"head/", None), (r"kernel$", P(None, "model"))]
    specs = cs.partition_specs(params, mesh, rules, default=cs.FSDP)
    assert specs["head"]["kernel"] == P()  # first rule wins over the kernel rule
    assert specs["dense"]["kernel"] == P(None, "model")
    assert specs["dense"]["bias"] == P("data")  # FSDP default: 32 on the 4-way data axis
    assert specs["head"]["bias"] == P()
    sh = cs.named_shardings(params, mesh, rules, default=cs.FSDP)
    placed = jax.device_put(params, sh)
    assert placed["dense"]["kernel"].addressable_shards[0].data.shape == (16, 16)
    assert placed["dense"]["bias"].addressable_shards[0].data.shape == (8,)
    text = cs.describe_shardings(params, sh)
    assert f"dense/kernel  (16, 32) float32  {P(None, 'model')}" in text


def test_rules_shard_optimizer_state_like_params(rng):
    mesh = cs.make_mesh({"data": 8}, DEVICES)
    params = _params(rng)
    state = jax.eval_shape(lambda p: TrainState.create(p, optax.adam(1e-3), 0), params)
    specs = cs.partition_specs(state, mesh, [(r"kernel$", cs.FSDP)])
    mu = specs.opt_state[0].mu
    assert mu["dense"]["kernel"] == specs.params["dense"]["kernel"] == P(None, "data")
    assert specs.opt_state[0].nu["head"]["kernel"] == P("data", None)
    assert specs.params["dense"]["bias"] == P()  # no rule: replicated default
    assert specs.step == P() and specs.key == P()


@pytest.mark.parametrize(
    "rules, match",
    [
        ([(r"nothing-matches", P("modle"))], r"names mesh axis 'modle', but the mesh has axes \('data', 'model'\)"),
        ([(r"bias$", P(None, "data"))], r"rules\[0\] \('bias\$'\) at 'dense/bias'.*2 entries"),
        ([(r"head/kernel", P(None, ("data", "model")))], r"dimension 1 of shape \(32, 4\) has size 4, not divisible by mesh axes \('data', 'model'\) of size 8"),
        ([(r"kernel", "shard")], r"has value 'shard'"),
        ([(r"kernel",)], r"must be a \(regex, PartitionSpec\) pair"),
        ([(r"kernel", P(("data", "data")))], r"uses a mesh axis twice"),
    ],
)  # fmt: skip
def test_partition_rules_bad_input(rng, rules, match):
    mesh = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    with pytest.raises(ValueError, match=match):
        cs.partition_specs(_params(rng), mesh, rules)


def test_fsdp_unknown_axis():
    mesh = cs.make_mesh({"batch": 8}, DEVICES)
    with pytest.raises(
        ValueError, match=r"names mesh axis 'data', but the mesh has axes \('batch',\)"
    ):
        cs.partition_specs({"w": jnp.ones(8)}, mesh, default=cs.FSDP)


def test_stacked_shardings(rng):
    mesh = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    stacked = jax.tree.map(lambda x: np.stack([x] * 8), _params(rng))
    sh = cs.stacked_shardings(stacked, mesh, task_axis="data")
    assert sh["dense"]["kernel"].spec == P("data")
    sh = cs.stacked_shardings(stacked, mesh, task_axis="data", default=cs.FSDP, fsdp_axis="model")
    assert sh["dense"]["kernel"].spec == P("data", None, "model")
    sh = cs.stacked_shardings(stacked, mesh, task_axis=None, default=cs.FSDP)
    assert sh["dense"]["kernel"].spec == P(None, None, "data")
    placed = jax.device_put(stacked, cs.stacked_shardings(stacked, mesh, task_axis="data"))
    assert placed["head"]["kernel"].addressable_shards[0].data.shape == (2, 32, 4)
    with pytest.raises(ValueError, match=r"T=3 trees, not divisible by mesh axis 'data' of size 4"):
        cs.stacked_shardings(jax.tree.map(lambda x: x[:3], stacked), mesh)
    with pytest.raises(ValueError, match=r"reuses the task axis 'data'"):
        cs.stacked_shardings(stacked, mesh, task_axis="data", default=cs.FSDP)


# ----------------------------------------------------------------------------- batches


def test_shard_batch_and_errors(rng):
    mesh = cs.make_mesh({"data": 4, "model": 2}, DEVICES)
    b = cs.shard_batch(_batch(rng, 8), mesh)
    assert b["x"].sharding.spec == P("data")
    assert b["x"].addressable_shards[0].data.shape == (2, 16)
    with pytest.raises(
        ValueError, match=r"has 6 examples \(global\), not divisible by mesh axis 'data' of size 4"
    ):
        cs.shard_batch(_batch(rng, 6), mesh)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        cs.check_batch({"x": np.ones((8, 2)), "y": np.ones(4)}, mesh)
    with pytest.raises(ValueError, match="'t' is a scalar"):
        cs.check_batch({"t": np.float32(1)}, mesh)
    with pytest.raises(ValueError, match="names mesh axis 'batch'"):
        cs.batch_sharding(mesh, "batch")


# ----------------------------------------------------------------------------- sharded states and steps


@pytest.mark.slow
@pytest.mark.parametrize("default", [cs.REPLICATED, cs.FSDP], ids=["dp", "fsdp"])
def test_sharded_training_equals_unsharded(rng, default):
    params = _params(rng)
    batches = [_batch(rng) for _ in range(2)]
    init = lambda p: TrainState.create(p, optax.adam(1e-2), key=0)

    ref = init(params)
    ref_step = make_step(_loss, donate=False)
    for b in batches:
        ref, ref_metrics = ref_step(ref, b)

    mesh = cs.make_mesh({"data": 8}, DEVICES)
    state, sh = cs.create_sharded_state(init, params, mesh=mesh, default=default)
    assert state.params["dense"]["kernel"].sharding == sh.params["dense"]["kernel"]
    step = cs.sharded_step(make_step(_loss, jit=False), sh, cs.batch_sharding(mesh))
    chex.assert_max_traces(n=1)  # the step compiles once
    for b in batches:
        old = state
        state, metrics = step(state, cs.shard_batch(b, mesh))
    assert old.params["dense"]["kernel"].is_deleted()  # donated
    assert state.opt_state[0].mu["dense"]["kernel"].sharding.spec == (
        P(None, "data") if default == cs.FSDP else P()
    )
    chex.assert_trees_all_close(state.params, ref.params, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(metrics["loss"], ref_metrics["loss"], rtol=2e-5)
    with pytest.raises(ValueError, match="not divisible by mesh axis 'data' of size 8"):
        step(state, _batch(rng, 12))


def test_sharded_step_keeps_the_nonfinite_policy(rng):
    """make_step's default ("raise") skips inside the sharded program and raises after it."""
    from cljax.train import NonFiniteError

    mesh = cs.make_mesh({"data": 8}, DEVICES)
    init = lambda p: TrainState.create(p, optax.adam(1e-2), key=0)
    bad = _batch(rng)
    bad["x"][3, 5] = np.nan
    for policy in ("raise", "skip"):
        state, sh = cs.create_sharded_state(init, _params(rng), mesh=mesh)
        before = jax.tree.map(np.asarray, state.params)
        step = cs.sharded_step(
            make_step(_loss, jit=False, nonfinite=policy), sh, cs.batch_sharding(mesh)
        )
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="step 0") as e:
                step(state, cs.shard_batch(bad, mesh))
            state = e.value.state
        else:
            state, _ = step(state, cs.shard_batch(bad, mesh))
        assert int(state.skipped) == 1
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), before)
        assert state.params["dense"]["kernel"].sharding == sh.params["dense"]["kernel"]


def test_dp_step_all_reduces_gradients_and_gathers_nothing(rng):
    mesh = cs.make_mesh({"data": 8}, DEVICES)
    init = lambda p: TrainState.create(p, optax.sgd(1e-2), key=0)
    state, sh = cs.create_sharded_state(init, _params(rng), mesh=mesh)
    step = cs.sharded_step(make_step(_loss, jit=False), sh, cs.batch_sharding(mesh))
    colls = cs.hlo_collectives(step.lower(state, cs.shard_batch(_batch(rng), mesh)).compile())
    kinds = {c.kind for c in colls}
    assert "all-gather" not in kinds
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    reduced = sum(c.result_bytes for c in colls if c.kind == "all-reduce")
    assert reduced >= 4 * n_params  # every gradient element is summed over the devices
    assert all(c.group_size == 8 for c in colls)


HLO = """HloModule jit_f, num_partitions=8
  %a = f32[16,8]{1,0} all-gather(f32[2,8]{1,0} %p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %b = (f32[4]{0}, bf16[6]{0}) all-reduce(f32[4]{0} %x, bf16[6]{0} %y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %c = f32[2]{0} reduce-scatter(f32[8]{0} %z), replica_groups=mesh['x'=4,'y'=2] {'x'}, dimensions={0}
  %d = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[2,8]{1,0} %p), replica_groups={}
  %e = f32[16,8]{1,0} all-gather-done(%d)
  %f = f32[3]{0} add(f32[3]{0} %u, f32[3]{0} %v)
"""


def test_hlo_collectives_parser_hand_case():
    colls = cs.hlo_collectives(HLO)
    assert [(c.kind, c.result_bytes, c.group_size) for c in colls] == [
        ("all-gather", 512, 8),
        ("all-reduce", 28, 2),
        ("reduce-scatter", 8, 4),
        ("all-gather", 512, 8),
    ]
    assert colls[0].wire_bytes == 512 * 7 / 8
    assert colls[1].wire_bytes == 28.0  # 2 (n-1)/n S with n = 2
    assert colls[2].wire_bytes == 24.0  # (n-1) s
    assert cs.collective_bytes(HLO) == {
        "all-gather": 896.0,
        "all-reduce": 28.0,
        "reduce-scatter": 24.0,
    }


# ----------------------------------------------------------------------------- checkpoints across meshes


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(rng, tmp_path):
    params = _params(rng)
    init = lambda p: TrainState.create(p, optax.adam(1e-2), key=jax.random.key(5))
    mesh8 = cs.make_mesh({"data": 8}, DEVICES)
    state, sh8 = cs.create_sharded_state(init, params, mesh=mesh8, default=cs.FSDP)
    step = cs.sharded_step(make_step(_loss, jit=False), sh8, cs.batch_sharding(mesh8))
    state, _ = step(state, cs.shard_batch(_batch(rng), mesh8))
    expected = jax.device_get(state)
    CheckpointManager(tmp_path).save(1, state)

    abstract = jax.eval_shape(init, params)
    for spec, devices in [({"data": 2, "model": 2}, DEVICES[4:]), ({"data": 1}, DEVICES[:1])]:
        mesh = cs.make_mesh(spec, devices)
        sh = cs.named_shardings(
            abstract, mesh, [(r"kernel$", P(None, "model"))] * ("model" in spec), default=cs.FSDP
        )
        got, _ = CheckpointManager(tmp_path).restore(1, cs.abstract_with_shardings(abstract, sh))
        chex.assert_trees_all_equal(jax.device_get(got.params), expected.params)
        chex.assert_trees_all_equal(jax.device_get(got.opt_state), expected.opt_state)
        assert int(got.step) == 1
        np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(state.key))
        leaf = got.params["dense"]["kernel"]
        assert leaf.sharding == sh.params["dense"]["kernel"]
        assert set(leaf.sharding.device_set) <= set(devices)
        if len(devices) > 1:  # the restored state trains on the new mesh
            new_step = cs.sharded_step(make_step(_loss, jit=False), sh, cs.batch_sharding(mesh))
            got, m = new_step(got, cs.shard_batch(_batch(rng, 8), mesh))
            assert np.isfinite(float(m["loss"]))


# ----------------------------------------------------------------------------- processes


def test_initialize_distributed_single_process_and_errors():
    info = cs.initialize_distributed(num_processes=1)
    assert (info.process_index, info.process_count, info.device_count) == (0, 1, 8)
    assert cs.initialize_distributed(auto=False).cluster is None
    with pytest.raises(
        ValueError, match=r"got \['coordinator_address'\] but not \['num_processes', 'process_id'\]"
    ):
        cs.initialize_distributed("127.0.0.1:1")
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        cs.initialize_distributed("127.0.0.1:1", 2, 2)
    with pytest.raises(ValueError, match=r"num_processes=0 must be >= 1"):
        cs.initialize_distributed(num_processes=0)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"TPU_WORKER_HOSTNAMES": "t0"}, None),  # one TPU host (Colab): no runtime needed
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "env"),
    ],
)
def test_cluster_environment(env, expected):
    assert cs.cluster_environment(env) == expected


def test_primary_helpers(capsys, monkeypatch):
    calls = []
    f = cs.on_primary(lambda x: calls.append(x) or x)
    assert f(3) == 3 and calls == [3]
    cs.primary_print("hello")
    assert capsys.readouterr().out == "hello\n"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert f(4) is None and calls == [3]
    cs.primary_print("quiet")
    assert capsys.readouterr().out == ""
    logger = logging.getLogger("cljax.test_sharding")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    cs.setup_logging(logging.INFO, logger)
    cs.setup_logging(logging.INFO, logger)
    assert sum(isinstance(x, cs._PrimaryFilter) for x in logger.filters) == 1
    records = []
    monkeypatch.setattr(handler, "emit", records.append)
    logger.info("dropped on process 1")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    logger.info("kept on process 0")
    assert [r.getMessage() for r in records] == ["kept on process 0"]
    logger.removeHandler(handler)


def test_named_shardings_are_namedshardings(rng):
    mesh = cs.make_mesh({"data": 8}, DEVICES)
    sh = cs.named_shardings(_params(rng), mesh, default=cs.FSDP)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(sh))
    assert cs.replicated(mesh).spec == P()


def test_data_parallel_value_and_grad_reduces_only_the_small_gradient(rng):
    mesh = cs.make_mesh({"data": 8}, DEVICES)
    params, batch = _params(rng), _batch(rng)
    scale = {"s": jnp.ones((4,), jnp.float32)}  # a few trained scalars over a frozen model

    def loss(sc, b, p):
        h = jnp.tanh(b["x"] @ p["dense"]["kernel"]) @ p["head"]["kernel"]
        return jnp.mean((h * sc["s"] - b["y"]) ** 2), {"mean_h": jnp.mean(h)}

    want = jax.jit(jax.value_and_grad(loss, has_aux=True))(scale, batch, params)
    vg = cs.data_parallel_value_and_grad(loss, mesh, has_aux=True)
    rep, bsh = cs.replicated(mesh), cs.batch_sharding(mesh)
    f = jax.jit(vg, in_shardings=(rep, bsh, rep), out_shardings=rep)
    compiled = f.lower(scale, batch, params).compile()
    chex.assert_trees_all_close(compiled(scale, batch, params), want, rtol=1e-5, atol=1e-6)
    reduced = sum(c.result_bytes for c in cs.hlo_collectives(compiled))
    assert reduced <= 4 * (4 + 2)  # the 4 scalars' gradient, the loss and the aux
