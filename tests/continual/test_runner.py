"""The task-sequence runner: scenarios, hook order, accuracy matrix, checkpoint and resume."""

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import continual as cl
from cljax import projection as pj
from cljax.data import Task


def _tasks(num_tasks=3, classes=2, dim=6, n=96, seed=0):
    """Linearly separable toy tasks: each task its own random class means."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(num_tasks):
        means = rng.normal(size=(classes, dim)) * 3
        y = rng.integers(0, classes, size=n).astype(np.int32)
        x = (means[y] + rng.normal(size=(n, dim))).astype(np.float32)
        names = tuple(f"c{t}{k}" for k in range(classes))
        out.append(Task(f"t{t}", names, x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:]))
    return out


class _MLP(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(self.out)(x)


def _setup(out):
    model = _MLP(out)
    params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
    return model, params, (lambda p, x: model.apply({"params": p}, x))


def test_head_layouts():
    tasks = _tasks(3, classes=2)
    lt = cl.HeadLayout.build("task", tasks)
    assert lt.num_outputs == 6 and lt.offsets == (0, 2, 4)
    np.testing.assert_array_equal(lt.train_mask(1), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(lt.old_mask(2), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(lt.global_labels(np.array([0, 1]), 2), [4, 5])
    lc = cl.HeadLayout.build("class", tasks)
    assert lc.num_outputs == 6
    # one growing head: train and test over the classes seen so far, no task id
    np.testing.assert_array_equal(lc.train_mask(1), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(lc.eval_mask(0, after=2), [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(lc.eval_mask(1), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(lc.eval_mask(2, after=0), [1, 1, 1, 1, 1, 1])
    ln = cl.HeadLayout.build("class", tasks, class_loss="new")  # PyCIL's / CoSO's local CE
    np.testing.assert_array_equal(ln.train_mask(1), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(ln.eval_mask(0, after=1), [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"class_loss='old'"):
        cl.HeadLayout.build("class", tasks, class_loss="old")
    ld = cl.HeadLayout.build("domain", tasks)
    assert ld.num_outputs == 2 and ld.offsets == (0, 0, 0)
    assert not ld.old_mask(0).any() and ld.old_mask(1).all()


def _recorder(calls):
    """A method counting its in-step updates and recording its between-task hooks."""

    def hook(kind):
        def record(state, ctx):
            calls.append((kind, ctx.index, int(state.step)))
            return state

        return record

    return cl.Method(
        init=lambda params: {"n": jnp.zeros((), jnp.int32)},
        update=lambda params, s, *, step: (params, {"n": s["n"] + 1}),
        begin_task=hook("begin"),
        end_task=hook("end"),
        name="rec",
    )


@pytest.mark.slow
def test_hooks_run_in_order_and_matrix_is_filled():
    tasks = _tasks(3)
    _, params, apply_fn = _setup(6)
    calls = []
    rec = _recorder(calls)
    res = cl.run_sequence(
        tasks,
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=5,
        batch_size=16,
        methods=[rec],
        scenario="task",
        evaluate_initial=True,
    )
    assert calls == [
        ("begin", 0, 0),
        ("end", 0, 5),
        ("begin", 1, 5),
        ("end", 1, 10),
        ("begin", 2, 10),
        ("end", 2, 15),
    ]
    assert int(res.state.methods["rec"]["n"]) == 15
    assert res.accuracy.shape == (3, 3) and res.initial.shape == (3,)
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    assert set(res.metrics) >= {"acc", "bwt", "fwt", "mtil_transfer"}
    assert res.metrics["acc"] == pytest.approx(res.accuracy[-1].mean())


@pytest.mark.slow
def test_default_eval_is_the_masked_argmax_accuracy():
    tasks = _tasks(2)
    _, params, apply_fn = _setup(4)
    res = cl.run_sequence(
        tasks,
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=20,
        batch_size=16,
        scenario="task",
    )
    p = res.state.params
    for i, t in enumerate(tasks):
        z = np.asarray(apply_fn(p, t.x_test))[:, 2 * i : 2 * i + 2]
        assert res.accuracy[1, i] == pytest.approx(np.mean(z.argmax(1) == t.y_test))
    custom = cl.run_sequence(
        tasks,
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=2,
        batch_size=16,
        scenario="task",
        eval_fn=lambda p, i, t: 0.25 * (i + 1),
    )
    np.testing.assert_allclose(custom.accuracy, [[0.25, 0.5], [0.25, 0.5]])


@pytest.mark.slow
def test_a_sequence_compiles_its_step_once(caplog):
    # Each task's first step gets a fresh optimiser state and the hooks' new arrays; were they
    # left uncommitted, the step (fed committed outputs afterwards) would compile twice.
    _, params, apply_fn = _setup(6)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        cl.run_sequence(
            _tasks(3),
            apply_fn=apply_fn,
            params=params,
            optimizer=optax.adam(1e-2),
            steps_per_task=3,
            batch_size=16,
            methods=[cl.ewc(weight=1.0)],
            scenario="task",
            reset_optimizer=True,
        )
    compiles = [r for r in caplog.messages if re.match(r"Compiling (jit\()?step\b", r)]
    assert len(compiles) == 1, compiles


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    tasks = _tasks(3)
    model, params, apply_fn = _setup(2)
    rec = jax.jit(lambda p, x: pj.record_layer_inputs(model, {"params": p}, x))
    make = lambda: [
        cl.gpm([("kernel", True)], rec, threshold=0.9, num_samples=32),
        cl.ewc(weight=1.0, fisher_samples=16),
    ]
    kw = dict(
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=8,
        batch_size=16,
        scenario="domain",
    )
    d = tmp_path / "ckpt"
    full = cl.run_sequence(tasks, **kw, methods=make(), checkpoint_dir=d)
    # Simulate a crash after task 1: drop the last boundary checkpoint and run again.
    import shutil

    shutil.rmtree(d / "step_3")
    again = cl.run_sequence(tasks, **kw, methods=make(), checkpoint_dir=d)
    assert again.resumed_from == 2
    np.testing.assert_allclose(again.accuracy, full.accuracy, atol=1e-6)
    g_full = pj.find_state(full.state.opt_state, pj.GPMState)[0]
    g_again = pj.find_state(again.state.opt_state, pj.GPMState)[0]
    np.testing.assert_allclose(g_again.memory[0], g_full.memory[0], atol=1e-5)
    assert int(g_again.task) == 3
    np.testing.assert_allclose(
        again.state.methods["ewc"].fisher["Dense_0"]["kernel"],
        full.state.methods["ewc"].fisher["Dense_0"]["kernel"],
        rtol=1e-5,
    )


@pytest.mark.slow
def test_bad_inputs(tmp_path):
    _, params, apply_fn = _setup(2)
    kw = dict(
        apply_fn=apply_fn, params=params, optimizer=optax.sgd(0.1), steps_per_task=1, batch_size=4
    )
    with pytest.raises(ValueError, match=r"tasks is empty"):
        cl.run_sequence([], **kw)
    with pytest.raises(ValueError, match=r"scenario='multi' must be one of"):
        cl.run_sequence(_tasks(1), **kw, scenario="multi")
    with pytest.raises(ValueError, match=r"method names must be unique"):
        cl.run_sequence(_tasks(1), **kw, methods=[cl.ewc(weight=1.0), cl.ewc(weight=2.0)])
    with pytest.raises(ValueError, match=r"steps_per_task=0"):
        cl.run_sequence(_tasks(1), **{**kw, "steps_per_task": 0})
    cl.run_sequence(_tasks(2), **kw, checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"2-task run; this run has 3 tasks"):
        cl.run_sequence(_tasks(3), **kw, checkpoint_dir=tmp_path / "c")
