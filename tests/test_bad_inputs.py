"""The bad-input catalogue: every row is tried here, and docs/bad-inputs.md is generated from it.

Each row names a bad input, builds it, and states the exception type and a regex its message
must match. ``python tests/test_bad_inputs.py`` rewrites the table in
docs/bad-inputs.md; ``test_doc_is_current`` fails when the doc and this catalogue disagree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

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


def _nonfinite_step(_):
    import optax

    from cljax.train import TrainState, make_step

    state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1))
    step = make_step(lambda p, b, r: jnp.sum(p["w"] * b), nonfinite="raise", donate=False)
    return step(state, jnp.array([np.nan, 1.0]))


def _corrupt_safetensors(tmp):
    from cljax import safetensors as st

    f = tmp / "bad.safetensors"
    st.save(f, {"w": np.ones((4, 4), np.float32)})
    f.write_bytes(f.read_bytes()[:-7])
    return st.load(f)


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
            "NaN gradients with `nonfinite='raise'`",
            _nonfinite_step,
            FloatingPointError,
            r"non-finite loss or gradient at step 0",
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
            "`keep` < 1",
            lambda tmp: __import__("cljax.checkpoint", fromlist=["x"]).CheckpointManager(
                tmp / "k", keep=0
            ),
            ValueError,
            r"keep=0",
        ),
    ]
    if _imports("cljax.safetensors"):
        rows.append(
            Row(
                "safetensors",
                "a truncated safetensors file",
                _corrupt_safetensors,
                ValueError,
                r"bad\.safetensors.*truncated",
            )
        )
    return rows


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
        msg = re.sub(r"/tmp/\S*?/", "…/", msg)
        lines.append(f"| {i} | {row.area} | {row.bad_input} | `{msg}` |")
    return "\n".join(lines)


_BEGIN, _END = "<!-- catalogue -->", "<!-- /catalogue -->"


def test_doc_is_current(tmp_path):
    text = DOC.read_text()
    got = text.split(_BEGIN, 1)[1].split(_END, 1)[0].strip()
    want_rows = [r.split("|")[3].strip() for r in render(tmp_path).splitlines()[2:]]
    have_rows = [r.split("|")[3].strip() for r in got.splitlines()[2:]]
    assert have_rows == want_rows, (
        "docs/bad-inputs.md is stale: run `python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        table = render(Path(d))
    text = DOC.read_text()
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    DOC.write_text(f"{head}{_BEGIN}\n{table}\n{_END}{tail}")
    print(f"wrote {len(CATALOGUE)} rows to {DOC}")
