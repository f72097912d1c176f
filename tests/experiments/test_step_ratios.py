"""The step-ratio benchmark's timing machinery: per-step clock inside ``atlas.fit``,
interleaved rounds, ratios of medians, and its input checks."""

import dataclasses
import json
import statistics
import time

import jax.numpy as jnp
import optax
import pytest

from cljax.merging import atlas
from cljax.train import TrainState, make_step
from experiments.benchmarks import step_ratios as S


def _linear_loss(p, batch, rng):
    return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


def test_compiled_step_threads_the_donated_state():
    state = TrainState.create({"w": jnp.eye(2)}, optax.sgd(0.1))
    batch = {"x": jnp.ones((3, 2)), "y": jnp.zeros((3, 2))}
    step = S._compiled_step("sgd", make_step(_linear_loss), state, batch)
    # Each call donates the state it is given: a second and third call only work if the
    # new state replaced the donated one.
    times = [step.run() for _ in range(3)]
    assert all(w > 0 and c >= 0 for w, c in times)
    assert step.compile_s > 0
    assert step.memory_mib is None or step.memory_mib > 0


def test_clock_times_each_step_of_fit():
    # batch_at runs inside each timed step: step s sleeps 20·s ms more than step 0, and the
    # clock must attribute it to that step, one entry per step.
    params = {"w": jnp.eye(2)}
    taus = {"w": jnp.ones((2, 2, 2))}
    batch = {"x": jnp.ones((3, 2)), "y": jnp.zeros((3, 2))}
    calls = []

    def batch_at(s):
        calls.append(s)
        time.sleep(0.02 * s)
        return batch

    clock = S._Clock()
    atlas.fit(_linear_loss, params, taus, batch_at, epochs=1, steps_per_epoch=3, progress=clock)
    assert len(clock.wall) == len(clock.cpu) == 3
    assert calls[-3:] == [0, 1, 2]  # the steps the clock saw
    assert clock.wall[1] >= 0.02 and clock.wall[2] >= 0.04
    assert clock.wall[2] - clock.cpu[2] >= 0.03  # sleeping costs wall time, not CPU time


def test_interleave_reverses_the_order_every_other_round():
    order = []

    def fake(name):
        def run():
            order.append(name)
            return 1.0, 0.5

        return S._Step(name, run, 0.0, None)

    steps = [fake("a"), fake("b"), fake("c")]
    S._interleave(steps, warmup=1, repeats=3)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(s.wall == [1.0] * 3 and s.cpu == [0.5] * 3 for s in steps)


def test_rows_give_ratios_of_medians_and_compile_from_the_first_step():
    base = S._Step("fine-tune", lambda: (0, 0), 2.0, 10.0, wall=[1.0, 3.0, 2.0], cpu=[2, 2, 9])
    other = S._Step(
        "aTLAS", lambda: (0, 0), 0.0, None, first_s=7.0, wall=[3.0, 9, 3], cpu=[1, 1, 1]
    )
    rows = S._rows("m", 4, [base, other], {"aTLAS": "fine-tune"})
    assert rows[0]["of"] == "" and rows[0]["compile (s)"] == 2.0
    assert rows[1]["of"] == "fine-tune"
    assert rows[1]["× (wall)"] == pytest.approx(3.0 / statistics.median([1.0, 3.0, 2.0]))
    assert rows[1]["× (CPU)"] == pytest.approx(1 / 2)
    assert rows[1]["compile (s)"] == pytest.approx(7.0 - 3.0)  # first step less the median
    assert rows[1]["peak (MiB)"] == "n/a"


@pytest.mark.parametrize(
    "change, word",
    [
        ({"models": ("vit-b16",)}, "models"),
        ({"methods": ("Nash",)}, "methods"),
        ({"atlas_split": "two"}, "atlas_split"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_config_is_refused_before_any_model_is_built(change, word):
    with pytest.raises(ValueError, match=word):
        S.run(dataclasses.replace(S.PRESETS["tiny"], **change))


@pytest.mark.long
def test_tiny_preset_end_to_end(tmp_path):
    res = S.main(["--preset", "tiny", "--out", str(tmp_path), "--small_repeats", "1"])
    steps = [r["step"] for r in res["rows"]]
    assert steps == ["fine-tune", "aTLAS (T=2, 3 programs)", "EW", "F-EW", "PCGrad", "F-PCGrad"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["step"] for r in saved["rows"]] == steps
    assert all(r["wall (ms)"] > 0 for r in saved["rows"])
