"""The MTIL-style sequence: stroke rendering, the reference set, disjoint domain tasks."""

import numpy as np
import pytest

from cljax.data import (
    merging_benchmark,
    mtil_domain_tasks,
    mtil_pretraining_data,
    mtil_reference_images,
    mtil_sequence,
    render_strokes,
)


def test_render_flat_signal_is_a_horizontal_line():
    img = render_strokes(np.zeros((1, 40)), size=28, margin=4)
    assert img.shape == (1, 28, 28, 1) and img.dtype == np.float32
    ink = img[0, :, :, 0]
    assert ink[:, :4].max() == 0 and ink[:, 24:].max() == 0  # margins stay empty
    # a zero signal sits on row (28 - 1) / 2 = 13.5: rows 13 and 14 carry the ink
    assert set(np.argmax(ink[:, 4:24], axis=0)) <= {13, 14}
    np.testing.assert_allclose(ink[13, 4:24], ink[14, 4:24])
    assert ink[[0, 27], :].max() < 1e-6


def test_render_steep_signal_stays_connected(rng):
    sig = np.where(np.arange(40) % 2 == 0, 1.0, -1.0)[None]  # jumps across the box
    ink = render_strokes(sig)[0, :, 4:24, 0]
    assert (ink.max(axis=0) > 0.9).all()  # every drawn column is inked
    # a jump fills the rows between the two extremes (no dotted stroke)
    assert (ink[5:23].max(axis=1) > 0.9).all()
    x = render_strokes(rng.normal(size=(5, 40)))
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_render_bad_inputs():
    with pytest.raises(ValueError, match="must be \\[N, L\\] with L >= 2"):
        render_strokes(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="leave no room"):
        render_strokes(np.zeros((1, 5)), size=8, margin=4)
    with pytest.raises(ValueError, match="width=0"):
        render_strokes(np.zeros((1, 5)), width=0)


def test_reference_images_are_distinct_strokes():
    a = mtil_reference_images(12, seed=0)
    assert a.shape == (12, 28, 28, 1) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert len(_keys(a)) == 12  # twelve different signals
    assert (a[:, :, 4:24].max(axis=(1, 3)) > 0.5).all()  # every column of the box is drawn
    with pytest.raises(ValueError, match="empty reference set"):
        mtil_reference_images(0)


def _keys(x):
    return {r.tobytes() for r in np.asarray(x, np.float32)}


@pytest.fixture(scope="module")
def tasks():
    return mtil_domain_tasks()


def test_domain_tasks_share_no_image_with_pretraining_or_across_splits(tasks):
    assert [t.name for t in tasks] == ["rotated", "inverted", "patches", "digits", "parity"]
    assert [t.num_classes for t in tasks] == [10, 10, 10, 10, 2]
    bench = merging_benchmark(0)
    np.testing.assert_array_equal(tasks[3].x_test, bench.task("digits").x_test)  # reused
    px, py = mtil_pretraining_data()
    assert px.shape[1:] == (28, 28, 1) and len(np.unique(py)) == 10
    parity = tasks[-1]  # upright MNIST images, relabelled
    pre = _keys(px)
    for split in ("train", "val", "test"):
        assert not pre & _keys(parity.split(split)[0])
    assert not _keys(parity.x_train) & _keys(parity.x_test)
    assert not pre & _keys(np.rot90(tasks[0].x_train, -1, axes=(1, 2)))
    assert set(parity.y_train.tolist()) == {0, 1}
    for t in tasks:
        assert t.x_train.shape[1:] == (28, 28, 1) and t.x_train.dtype == np.float32
        assert 0.0 <= t.x_train.min() and t.x_train.max() <= 1.0


def test_sequence_order_and_reference(tasks):
    seq = mtil_sequence(tasks, order=["digits", "rotated"], num_reference=12)
    assert seq.names == ("digits", "rotated")
    assert seq.reference.shape == (12, 28, 28, 1)
    assert "MNIST-1D" in seq.reference_source
    assert not _keys(seq.reference) & _keys(tasks[0].x_train)


def test_sequence_bad_inputs(tasks):
    with pytest.raises(ValueError, match="must name distinct tasks"):
        mtil_sequence(tasks, order=["digits", "nope"])
    with pytest.raises(ValueError, match="must name distinct tasks"):
        mtil_sequence(tasks, order=["digits", "digits"])
    with pytest.raises(ValueError, match="unique"):
        mtil_sequence([tasks[0], tasks[0]])
    with pytest.raises(ValueError, match="no tasks"):
        mtil_sequence([])
    with pytest.raises(ValueError, match="empty reference set"):
        mtil_sequence(tasks, num_reference=0)
