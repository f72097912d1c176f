"""The bad-input catalogue: every row is tried here, and docs/bad-inputs.md is generated from it.

Each row names a bad input, builds it, and states the exception type and a regex its message
must match. ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/test_bad_inputs.py`` rewrites the table in docs/bad-inputs.md (the sharding rows need the
8 simulated devices the tests run with); ``test_doc_is_current`` fails when the doc and this
catalogue disagree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@dataclasses.dataclass(frozen=True)
class Row:
    area: str
    bad_input: str
    call: Callable[[Path], object]
    error: type[BaseException]
    message: str  # regex the message must match


def _mixed_keys():
    return {"enc": {0: jnp.ones(2), "b": jnp.ones(2)}}


def _params():
    return {
        "enc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "head": {"kernel": jnp.ones((4, 2))},
    }


def _other_shape():
    p = _params()
    p["enc"]["kernel"] = jnp.ones((5, 4))
    return p


def _missing_leaf():
    p = _params()
    del p["enc"]["bias"]
    return p


def _nan_tree():
    p = _params()
    p["enc"]["bias"] = jnp.array([0.0, np.nan, 0.0, 0.0])
    return p


def _task_with_bad_labels(_):
    from cljax.data import Task

    x = np.zeros((4, 2), np.float32)
    return Task(
        "t", ("a", "b"), x, np.array([0, 1, 5, 0]), x, np.zeros(4, int), x, np.zeros(4, int)
    )


def _task(_=None):
    from cljax.data import Task

    x = np.zeros((8, 2), np.float32)
    y = np.zeros(8, np.int32)
    return Task("t", ("a", "b"), x, y, x, y, x, y)


def _corrupt_checkpoint(tmp):
    from cljax.checkpoint import CheckpointManager

    m = CheckpointManager(tmp / "ck")
    m.save(1, {"w": jnp.ones(3)})
    victim = max(
        (
            p
            for p in (tmp / "ck" / "step_1").rglob("*")
            if p.is_file() and p.name != "manifest.json"
        ),
        key=lambda p: p.stat().st_size,
    )
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00" if victim.stat().st_size else b"x")
    return m.verify(1)


def _checkpoint_wrong_target(tmp):
    from cljax.checkpoint import CheckpointManager

    m = CheckpointManager(tmp / "ck2")
    m.save(1, {"w": jnp.ones(3)})
    return m.restore(1, {"w": jnp.ones(3), "extra": jnp.ones(2)})


def _checkpoint_other_dtype(tmp):
    from cljax.checkpoint import CheckpointManager

    m = CheckpointManager(tmp / "ck3")
    m.save(1, {"w": jnp.full(3, 1.5, jnp.float32)})
    return m.restore(1, {"w": jnp.zeros(3, jnp.int32)})  # would truncate 1.5 to 1


def _safetensors_with_header(tmp, header: dict, data: bytes = b"\0" * 8):
    """A file with this JSON header (the 8-byte little-endian length, the header, the data)."""
    import json
    import struct

    from cljax import safetensors as st

    f = tmp / "bad.safetensors"
    h = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return st.load(f)


def _nonfinite_step(_):
    import optax

    from cljax.train import TrainState, make_step

    state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1))
    step = make_step(lambda p, b, r: jnp.sum(p["w"] * b), donate=False)  # default "raise"
    return step(state, jnp.array([np.nan, 1.0]))


def _nan_data_run(_):
    import optax

    from cljax import continual as cl
    from cljax.data import Task

    x = np.full((8, 2), np.nan, np.float32)
    y = np.zeros(8, np.int32)
    task = Task("t", ("a", "b"), x, y, x, y, x, y)
    return cl.run_sequence(
        [task],
        apply_fn=lambda p, x: x @ p["w"],
        params={"w": jnp.zeros((2, 2))},
        optimizer=optax.sgd(0.1),
        steps_per_task=2,
        batch_size=4,
    )


def _corrupt_safetensors(tmp):
    from cljax import safetensors as st

    f = tmp / "bad.safetensors"
    st.save(f, {"w": np.ones((4, 4), np.float32)})
    f.write_bytes(f.read_bytes()[:-7])
    return st.load(f)


def _stacked_t0():
    return jax.tree.map(lambda x: jnp.zeros((0, *x.shape)), _params())


def _overflowing_step(_):
    import optax

    from cljax.train import TrainState, make_step

    state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(1e38))
    step = make_step(lambda p, b: jnp.sum((p["w"] - b) ** 2), donate=False)
    return step(state, jnp.full(2, -10.0))


def _imports(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------ the catalogue


def _rows() -> list[Row]:
    from cljax import tree as ct

    rows = [
        Row(
            "tree",
            "trees of different shapes to `stack`",
            lambda _: ct.stack([_params(), _other_shape()]),
            ValueError,
            r"shape mismatch at path 'enc/kernel'",
        ),
        Row(
            "tree",
            "a tree with a missing leaf",
            lambda _: ct.check_same_structure(_params(), _missing_leaf()),
            ValueError,
            r"no leaf at path 'enc/bias'",
        ),
        Row(
            "tree", "an empty list of trees", lambda _: ct.as_stacked([]), ValueError, r"empty list"
        ),
        Row(
            "tree",
            "a dict whose keys mix int and str (JAX cannot sort them)",
            lambda _: __import__("cljax.merging", fromlist=["x"]).task_arithmetic(
                _mixed_keys(), [_mixed_keys()], 0.3
            ),
            TypeError,
            r"pretrained: the dict at path 'enc' has keys of mixed types",
        ),
        Row(
            "tree",
            "a stacked tree whose leaves disagree on T",
            lambda _: ct.num_stacked({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 1))}),
            ValueError,
            r"disagree on the leading",
        ),
        Row(
            "tree",
            "NaN in weights (`check_finite`)",
            lambda _: ct.check_finite(_nan_tree(), name="finetuned"),
            ValueError,
            r"finetuned has 1 non-finite value\(s\) at path 'enc/bias'",
        ),
        Row(
            "tree",
            "a string leaf in a parameter tree",
            lambda _: __import__("cljax.merging", fromlist=["x"]).task_arithmetic(
                {**_params(), "name": "enc"}, [{**_tv(), "name": "enc"}]
            ),
            TypeError,
            r"pretrained: leaf 'name' is a str \('enc'\), not an array",
        ),
        Row(
            "tree",
            "a Python float leaf in a parameter tree",
            lambda _: __import__("cljax.merging", fromlist=["x"]).ties({"w": 1.0}, [{"w": 0.5}]),
            TypeError,
            r"pretrained: leaf 'w' is a Python float \(1\.0\), not an array",
        ),
        Row(
            "tree",
            "a stacked tree with T = 0",
            lambda _: __import__("cljax.merging", fromlist=["x"]).task_arithmetic(
                _params(), _stacked_t0()
            ),
            ValueError,
            r"task_vectors: stacked tree has T=0",
        ),
        Row(
            "tree",
            "a path rule with an invalid regex",
            lambda _: ct.rule_values(_params(), [("(", 1)]),
            ValueError,
            r"invalid regex",
        ),
        Row(
            "tree",
            "a path rule that is not a pair",
            lambda _: ct.rule_values(_params(), ["head"]),
            ValueError,
            r"must be a \(regex, value\) pair",
        ),
        Row(
            "train",
            "an unknown non-finite policy",
            lambda _: __import__("cljax.train", fromlist=["make_step"]).make_step(
                lambda p, b, r: 0.0, nonfinite="ignore"
            ),
            ValueError,
            r"nonfinite='ignore'",
        ),
        Row(
            "train",
            "NaN gradients (`make_step`'s default `nonfinite='raise'`)",
            _nonfinite_step,
            FloatingPointError,
            r"non-finite loss, gradient or update at step 0 \(update skipped",
        ),
        Row(
            "train",
            "a learning rate that overflows the weights (finite gradients)",
            _overflowing_step,
            FloatingPointError,
            r"non-finite loss, gradient or update at step 0",
        ),
        Row(
            "data",
            "labels out of range",
            _task_with_bad_labels,
            ValueError,
            r"labels span \[0, 5\] but the task has 2 classes",
        ),
        Row(
            "data",
            "a batch larger than the dataset",
            lambda _: _task().steps_per_epoch(100),
            ValueError,
            r"batch_size=100 exceeds the 8 examples",
        ),
        Row(
            "data",
            "an unknown split name",
            lambda _: _task().split("dev"),
            ValueError,
            r"split='dev'",
        ),
        Row(
            "data",
            "a validation fraction outside (0, 1)",
            lambda _: __import__("cljax.data", fromlist=["x"]).split_train_val(
                np.arange(10), np.arange(10), fraction=1.5
            ),
            ValueError,
            r"fraction=1.5",
        ),
        Row(
            "checkpoint",
            "a corrupted checkpoint file",
            _corrupt_checkpoint,
            RuntimeError,
            r"step_1.*(checksum|bytes)",
        ),
        Row(
            "checkpoint",
            "a checkpoint restored into a different tree",
            _checkpoint_wrong_target,
            ValueError,
            r"does not fit the target tree",
        ),
        Row(
            "checkpoint",
            "a float32 checkpoint restored into an int32 target",
            _checkpoint_other_dtype,
            ValueError,
            r"'w' is stored as float32, the target has int32; pass allow_cast=True",
        ),
        Row(
            "checkpoint",
            "`keep` < 1",
            lambda tmp: __import__("cljax.checkpoint", fromlist=["x"]).CheckpointManager(
                tmp / "k", keep=0
            ),
            ValueError,
            r"keep=0",
        ),
    ]
    rows.append(
        Row(
            "safetensors",
            "a truncated safetensors file",
            _corrupt_safetensors,
            ValueError,
            r"bad\.safetensors.*truncated",
        )
    )
    f32 = lambda shape, offsets: {"dtype": "F32", "shape": shape, "data_offsets": offsets}  # noqa: E731
    rows += [
        Row(
            "safetensors",
            'a safetensors shape given as a string (`"12"`)',
            lambda tmp: _safetensors_with_header(tmp, {"w": f32("12", [0, 48])}, b"\0" * 48),
            ValueError,
            r"bad\.safetensors: tensor 'w': shape '12' must be a list of non-negative integers",
        ),
        Row(
            "safetensors",
            "a safetensors file with a gap between tensors",
            lambda tmp: _safetensors_with_header(
                tmp, {"a": f32([1], [0, 4]), "b": f32([1], [8, 12])}, b"\0" * 12
            ),
            ValueError,
            r"bad\.safetensors: tensor 'b' has data_offsets \[8, 12\].*without g",
        ),
        Row(
            "safetensors",
            "safetensors metadata that is not a string",
            lambda tmp: _safetensors_with_header(
                tmp, {"__metadata__": {"k": 1}, "w": f32([2], [0, 8])}
            ),
            ValueError,
            r"bad\.safetensors: __metadata__\['k'\] is 1, not a string",
        ),
    ]
    return rows + _method_rows()


def _tv():
    return jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), _params())


def _mesh_rows() -> list[Row]:
    from cljax import sharding

    devices = jax.devices()[:8]
    mesh4 = lambda: sharding.make_mesh({"data": 4}, devices[:4])
    return [
        Row(
            "sharding",
            "a mesh shape that does not divide the devices",
            lambda _: sharding.make_mesh({"data": 3}, devices),
            ValueError,
            r"3",
        ),
        Row(
            "sharding",
            "a batch not divisible by the data axis",
            lambda _: sharding.check_batch({"x": jnp.ones((6, 2))}, mesh4()),
            ValueError,
            r"6",
        ),
        Row(
            "sharding",
            "a partition rule that matches no leaf",
            lambda _: sharding.partition_specs(
                _params(), mesh4(), [("encoder/", jax.sharding.PartitionSpec())]
            ),
            ValueError,
            r"rules\[0\]=\('encoder/', 0\) selects no leaf",
        ),
        Row(
            "sharding",
            "a partition rule naming an unknown mesh axis",
            lambda _: sharding.partition_specs(
                _params(), mesh4(), [(".*", jax.sharding.PartitionSpec("nope"))]
            ),
            ValueError,
            r"nope",
        ),
    ]


def _method_rows() -> list[Row]:
    from cljax import averaging, merging, mtl
    from cljax import continual as cl
    from cljax.merging import atlas
    from cljax.models import clip

    two = jnp.stack([jnp.ones(4), -jnp.ones(4)])
    tvs2 = lambda: [_tv(), _tv()]
    rows = [
        Row(
            "merging",
            "TIES density outside (0, 1]",
            lambda _: merging.ties(_params(), [_tv()], density=0.0),
            ValueError,
            r"density=0.0",
        ),
        Row(
            "merging",
            "DARE drop rate outside [0, 1)",
            lambda _: merging.dare([_tv()], drop_rate=1.0, key=jax.random.key(0)),
            ValueError,
            r"drop_rate=1.0",
        ),
        Row(
            "merging",
            "an empty list of task vectors",
            lambda _: merging.task_arithmetic(_params(), []),
            ValueError,
            r"empty",
        ),
        Row(
            "merging",
            "a task vector of another shape",
            lambda _: merging.task_arithmetic(_params(), [_other_shape()]),
            ValueError,
            r"enc/kernel",
        ),
        Row(
            "merging",
            "NaN in a task vector with `check_finite=True`",
            lambda _: merging.ties(_params(), [_nan_tree()], check_finite=True),
            ValueError,
            r"non-finite",
        ),
        Row(
            "merging",
            "TIES `density=True` (a bool, not a fraction)",
            lambda _: merging.ties(_params(), [_tv()], density=True),
            ValueError,
            r"density=True must be a real number",
        ),
        Row(
            "merging",
            "a numpy `float32` density outside (0, 1]",
            lambda _: merging.ties(_params(), [_tv()], density=np.float32(1.5)),
            ValueError,
            r"density=.*1\.5.* must be in \(0, 1\]",
        ),
        Row(
            "merging",
            "a NaN `scale`",
            lambda _: merging.task_arithmetic(_params(), [_tv()], scale=float("nan")),
            ValueError,
            r"scale=nan must be finite",
        ),
        Row(
            "merging",
            "a non-scalar `scale`",
            lambda _: merging.task_arithmetic(_params(), [_tv()], scale=jnp.ones(4)),
            ValueError,
            r"scale=.* must be a scalar",
        ),
        Row(
            "merging",
            "average weights summing to 0",
            lambda _: merging.average([_params(), _params()], weights=[1.0, -1.0]),
            ValueError,
            r"sum to 0",
        ),
        Row(
            "merging",
            "NaN in a task vector for `task_arithmetic(check_finite=True)`",
            lambda _: merging.task_arithmetic(_params(), [_nan_tree()], check_finite=True),
            ValueError,
            r"non-finite",
        ),
        Row(
            "merging",
            "an unknown TIES merge function",
            lambda _: merging.ties(_params(), [_tv()], merge="max"),
            ValueError,
            r"merge='max'",
        ),
        Row(
            "merging",
            "NaN among the average weights",
            lambda _: merging.average([_params(), _params()], weights=[1.0, float("nan")]),
            ValueError,
            r"weights=\[1\.0, nan\] must be finite",
        ),
        Row(
            "merging",
            "NaN in the scale grid of `select_scale`",
            lambda _: merging.select_scale(lambda s: 0.0, grid=[0.0, float("nan")]),
            ValueError,
            r"select_scale: grid\[1\]=nan must be finite",
        ),
        Row(
            "aTLAS",
            "aTLAS×K with K < 1",
            lambda _: atlas.blocks(_params(), partitions=0),
            ValueError,
            r"partitions=0",
        ),
        Row(
            "aTLAS",
            "coefficients of the wrong shape",
            lambda _: atlas.compose(
                _params(),
                tvs2(),
                jax.tree.map(lambda c: jnp.ones(3), atlas.init(_params(), tvs2())),
            ),
            ValueError,
            r"coefficients\['enc/bias'\] has shape \(3,\), expected \(2,\)",
        ),
        Row(
            "aTLAS",
            "aTLAS×K with K = 10⁹ (more groups than any block has entries)",
            lambda _: atlas.blocks(_params(), partitions=10**9),
            ValueError,
            r"partitions=1000000000 exceeds the 12 entries of the largest partitioned block",
        ),
        Row(
            "aTLAS",
            "NaN coefficients",
            lambda _: atlas.compose(
                _params(),
                tvs2(),
                jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), atlas.init(_params(), tvs2())),
            ),
            ValueError,
            r"coefficients\['enc/bias'\] holds NaN or Inf",
        ),
        Row(
            "aTLAS",
            "a string leaf in the parameters of `blocks`",
            lambda _: atlas.blocks({**_params(), "name": "enc"}),
            TypeError,
            r"params: leaf 'name' is a str",
        ),
        Row("mtl", "CAGrad with c < 0", lambda _: mtl.cagrad(two, c=-1.0), ValueError, r"c=-1.0"),
        Row(
            "mtl",
            "CAGrad with c = inf",
            lambda _: mtl.cagrad(two, c=float("inf")),
            ValueError,
            r"cagrad: c=inf must be finite",
        ),
        Row(
            "mtl",
            "an aggregator given a NaN gradient",
            lambda _: mtl.pcgrad(two.at[1, 2].set(jnp.nan), key=jax.random.key(0)),
            ValueError,
            r"pcgrad: task_grads\[1\] holds NaN or Inf",
        ),
        Row(
            "mtl",
            "a stacked gradient with T = 0",
            lambda _: mtl.mgda(jnp.zeros((0, 4))),
            ValueError,
            r"mgda: task_grads: stacked tree has T=0",
        ),
        Row(
            "mtl",
            "SAM with `rho=inf`",
            lambda _: mtl.sam_perturbation(_tv(), _params(), rho=float("inf")),
            ValueError,
            r"sam_perturbation: rho=inf must be finite",
        ),
        Row(
            "mtl",
            "SAM with `rho=True`",
            lambda _: mtl.sam_perturbation(_tv(), _params(), rho=True),
            ValueError,
            r"sam_perturbation: rho=True must be a real number",
        ),
        Row(
            "mtl",
            "SAM with gradients of another tree",
            lambda _: mtl.sam_perturbation(_missing_leaf(), _params(), rho=0.1),
            ValueError,
            r"grads has no leaf at path 'enc/bias'",
        ),
        Row(
            "mtl",
            "SAM with gradients of another shape",
            lambda _: mtl.sam_perturbation(_other_shape(), _params(), rho=0.1),
            ValueError,
            r"shape mismatch at path 'enc/kernel': params has \(3, 4\), grads has \(5, 4\)",
        ),
        Row(
            "mtl",
            "F-MTL with `rho=inf`",
            lambda _: mtl.fmtl(lambda p, b: jnp.zeros(2), rho=float("inf")),
            ValueError,
            r"fmtl: rho=inf must be finite",
        ),
        Row(
            "mtl",
            "F-MTL with rho < 0",
            lambda _: mtl.fmtl(lambda p, b: jnp.zeros(2), rho=-0.1),
            ValueError,
            r"rho=-0.1",
        ),
        Row(
            "mtl",
            "F-MTL unrolled without a task batch size",
            lambda _: mtl.fmtl(lambda p, b: jnp.zeros(2), rho=0.1, unroll=True),
            ValueError,
            r"fmtl: unroll=True needs a task_batch_size",
        ),
        Row(
            "mtl",
            "an aggregator given one task",
            lambda _: mtl.mgda(jnp.ones((1, 4))),
            ValueError,
            r"mgda: got T=1 task gradients",
        ),
        Row(
            "continual",
            "an empty task sequence",
            lambda _: cl.run_sequence(
                [], apply_fn=None, params={}, optimizer=None, steps_per_task=1, batch_size=1
            ),
            ValueError,
            r"tasks is empty",
        ),
        Row(
            "continual",
            "a checkpoint interval that is not a positive int",
            lambda tmp: cl.run_sequence(
                [_task()],
                apply_fn=None,
                params={},
                optimizer=None,
                steps_per_task=1,
                batch_size=1,
                checkpoint_dir=tmp,
                checkpoint_every=0,
            ),
            ValueError,
            r"checkpoint_every=0 must be a positive int",
        ),
        Row(
            "continual",
            "an unknown non-finite policy",
            lambda _: cl.run_sequence(
                [_task()],
                apply_fn=None,
                params={},
                optimizer=None,
                steps_per_task=1,
                batch_size=1,
                nonfinite="apply",
            ),
            ValueError,
            r"nonfinite='apply' must be one of",
        ),
        Row(
            "continual",
            'a NaN in the training data (default `nonfinite="raise"`)',
            _nan_data_run,
            FloatingPointError,
            r"non-finite loss, gradient or update at step 0 of task 0 \('t'\)",
        ),
        Row(
            "continual",
            "a GPM threshold outside (0, 1]",
            lambda _: cl.gpm([("k", True)], None, threshold=1.5),
            ValueError,
            r"1.5",
        ),
        Row(
            "averaging",
            "an EMA decay outside [0, 1)",
            lambda _: averaging.ema(decay=1.0),
            ValueError,
            r"decay=1.0",
        ),
        Row(
            "averaging",
            "an EMA decay that is an array",
            lambda _: averaging.ema(decay=jnp.full(2, 0.5)),
            ValueError,
            r"ema: decay=.* must be a scalar; got shape \(2,\)",
        ),
        Row(
            "averaging",
            "`swa(every=2.5)`",
            lambda _: averaging.swa(every=2.5),
            ValueError,
            r"swa: every=2.5 must be an integer >= 1",
        ),
        Row(
            "averaging",
            "a weight-ensemble every < 1",
            lambda _: averaging.weight_ensemble(every=0),
            ValueError,
            r"every=0",
        ),
        Row(
            "clip",
            "an unknown CLIP config",
            lambda _: clip.clip_config("ViT-H/99"),
            ValueError,
            r"name='ViT-H/99' is not a known CLIP config",
        ),
        Row(
            "clip",
            "a prompt template without `{}`",
            lambda _: clip.zero_shot_head(
                lambda t: jnp.ones((len(t), 4)), ["a"], ["no placeholder"]
            ),
            ValueError,
            r"templates\[0\]",
        ),
        Row(
            "clip",
            "a checkpoint with missing and extra keys",
            lambda _: clip.from_hf_state_dict(
                {"extra.weight": np.zeros(2)}, clip.CLIPImageEncoder(clip.clip_config("ViT-B/32"))
            ),
            ValueError,
            r"(?s)state .*does not fit.*missing keys \(200\).*unexpected keys \(1\)",
        ),
        Row(
            "data",
            "an unknown TFDS dataset name",
            lambda _: __import__("cljax.data", fromlist=["x"]).TFDSTask("imagenet-zz"),
            ValueError,
            r"name='imagenet-zz' is not a known dataset",
        ),
        Row(
            "experiments",
            "an unknown preset",
            lambda tmp: __import__("experiments.merging", fromlist=["x"]).main(
                ["--preset", "clip-nope", "--out", str(tmp)]
            ),
            ValueError,
            r"clip-nope.*not one of",
        ),
    ]
    return rows + _mesh_rows()


CATALOGUE = _rows()


@pytest.mark.parametrize("row", CATALOGUE, ids=[f"{r.area}:{r.bad_input}" for r in CATALOGUE])
def test_bad_input(row, tmp_path):
    with pytest.raises(row.error) as e:
        row.call(tmp_path)
    assert re.search(row.message, str(e.value)), (
        f"message {str(e.value)!r} does not match {row.message!r}"
    )


def _message_of(row, tmp):
    try:
        row.call(tmp)
    except row.error as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "(no error)"


def render(tmp: Path) -> str:
    lines = [
        "| # | area | bad input | error |",
        "|---|---|---|---|",
    ]
    for i, row in enumerate(CATALOGUE, 1):
        msg = _message_of(row, tmp).replace("|", "\\|")
        msg = msg.replace(str(tmp), "…")
        lines.append(f"| {i} | {row.area} | {row.bad_input} | `{msg}` |")
    return "\n".join(lines)


_BEGIN, _END = "<!-- catalogue -->", "<!-- /catalogue -->"


@pytest.mark.slow
def test_doc_is_current(tmp_path):
    text = DOC.read_text()
    got = text.split(_BEGIN, 1)[1].split(_END, 1)[0].strip()
    want_rows = [r.split("|")[3:5] for r in render(tmp_path).splitlines()[2:]]
    have_rows = [r.split("|")[3:5] for r in got.splitlines()[2:]]
    assert have_rows == want_rows, (
        "docs/bad-inputs.md is stale: run `XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(DOC.parents[1]))  # the experiments package
    if jax.device_count() < 8:
        sys.exit(
            "the sharding rows need 8 devices: run with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )

    with tempfile.TemporaryDirectory() as d:
        table = render(Path(d))
    text = DOC.read_text()
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    DOC.write_text(f"{head}{_BEGIN}\n{table}\n{_END}{tail}")
    print(f"wrote {len(CATALOGUE)} rows to {DOC}")
