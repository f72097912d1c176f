"""The embedded 8-task benchmark: splits, labels, determinism, held-out drawing."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cljax.data import EMBEDDED_TASKS, _embedded, embedded_benchmark


@pytest.fixture(scope="module")
def bench():
    return embedded_benchmark(7, train_size=60, val_size=20, test_size=30)


def _hashes(x):
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in x}


def test_tasks_splits_and_labels(bench):
    assert bench.names == EMBEDDED_TASKS
    for task in (*bench.tasks, bench.control):
        for split in ("train", "val", "test"):
            x, y = task.split(split)
            assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
            assert y.dtype == np.int32 and len(x) == len(y)
            assert 0 <= y.min() and y.max() < task.num_classes
        # The three splits share no image.
        tr, va, te = (_hashes(task.split(s)[0]) for s in ("train", "val", "test"))
        assert not (tr & va or tr & te or va & te), task.name
        assert bench.templates[task.name] and all(
            t.count("{}") == 1 for t in bench.templates[task.name]
        )
    sizes = {t.name: (len(t.y_train), len(t.y_val), len(t.y_test)) for t in bench.tasks}
    assert sizes["letters"] == (60, 20, 30) and sizes["mnist"] == (60, 20, 30)
    assert bench.task("control") is bench.control
    with pytest.raises(ValueError, match="unknown task"):
        bench.task("cars")


def test_procedural_tasks_are_balanced_and_deterministic(bench):
    again = _embedded._build("signs", 7, 60, 20, 30)
    np.testing.assert_array_equal(again.x_train, bench.task("signs").x_train)
    counts = np.bincount(bench.task("textures").y_train, minlength=8)
    assert counts.max() - counts.min() <= 1
    other = _embedded._build("signs", 8, 60, 20, 30)
    assert not np.array_equal(other.x_train, again.x_train)


def test_real_tasks_hold_the_bundled_digits(bench):
    from cljax.data import load_digits, load_mnist5k

    x, _ = load_mnist5k()
    mnist = bench.task("mnist")
    # Every MNIST image is a padded MNIST-5k digit, its label the file's.
    raw = {hashlib.sha1(np.round(im * 255).astype(np.uint8).tobytes()).hexdigest() for im in x}
    inner = mnist.x_train[:, 2:30, 2:30, 0]
    assert _hashes(inner) <= raw
    assert len(load_digits()[0]) == 1797


def test_cache_round_trip(tmp_path):
    a = embedded_benchmark(
        1, tasks=("shapes", "digits"), train_size=12, val_size=4, test_size=5, cache_dir=tmp_path
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3  # shapes, digits, control
    _embedded._benchmark.cache_clear()
    b = embedded_benchmark(
        1, tasks=("shapes", "digits"), train_size=12, val_size=4, test_size=5, cache_dir=tmp_path
    )
    for ta, tb in zip((*a.tasks, a.control), (*b.tasks, b.control), strict=True):
        np.testing.assert_array_equal(ta.x_test, tb.x_test)
    # A damaged cache file is rebuilt, not a crash.
    victim = next(tmp_path.glob("shapes-*.npz"))
    victim.write_bytes(victim.read_bytes()[:100])
    _embedded._benchmark.cache_clear()
    c = embedded_benchmark(
        1, tasks=("shapes", "digits"), train_size=12, val_size=4, test_size=5, cache_dir=tmp_path
    )
    np.testing.assert_array_equal(c.tasks[0].x_test, a.tasks[0].x_test)


def test_concurrent_cache_writers_use_their_own_temporary_files(tmp_path, monkeypatch):
    # Two processes building the same task at once (the workers of one run) each write a
    # temporary file and rename it into place; with a shared temporary name one could rename
    # the other's half-written file.
    written = []
    real_savez = np.savez

    def savez(file, **arrays):
        written.append(Path(file).name)
        real_savez(file, **arrays)

    monkeypatch.setattr(_embedded.np, "savez", savez)
    for _ in range(2):
        _embedded._cached("shapes", 1, (4, 2, 3), tmp_path / "a")
        (tmp_path / "a").rename(tmp_path / f"b{len(written)}")
    assert len(written) == 2 and written[0] != written[1]
    assert all(name.startswith("shapes-") and name.endswith(".part.npz") for name in written)
    assert not list(tmp_path.glob("*/*.part.npz"))  # renamed into place


@pytest.mark.slow
def test_parallel_workers_draw_the_same_bytes():
    kw = dict(tasks=("letters", "mnist"), train_size=6, val_size=3, test_size=4)
    a = embedded_benchmark(2, **kw)
    b = embedded_benchmark(2, workers=2, **kw)
    for ta, tb in zip((*a.tasks, a.control), (*b.tasks, b.control), strict=True):
        np.testing.assert_array_equal(ta.x_train, tb.x_train)
        np.testing.assert_array_equal(ta.y_test, tb.y_test)
    with pytest.raises(ValueError, match="workers"):
        embedded_benchmark(workers=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tasks"):
        embedded_benchmark(tasks=("cars",))
    with pytest.raises(ValueError, match="val_size"):
        embedded_benchmark(val_size=0)
    with pytest.raises(ValueError, match="train_size"):
        embedded_benchmark(train_size=2.5)


@pytest.mark.slow
def test_the_guide_runs():
    """Every python block of docs/embedded-foundation.md runs, in order."""
    import re
    from pathlib import Path

    guide = Path(__file__).resolve().parents[2] / "docs" / "embedded-foundation.md"
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S):
        exec(compile(code, str(guide), "exec"), namespace)
    assert namespace["head"]["kernel"].shape[1] == 26
