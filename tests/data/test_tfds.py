"""TFDS tasks on ``tfds.testing.mock_data``: shapes, dtypes, normalisation, split sizes."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from cljax.data._tfds import CLIP_MEAN, CLIP_STD, TFDSTask, clip_preprocess  # noqa: E402


def test_clip_preprocess_resizes_crops_and_normalises(rng):
    img = np.full((2, 40, 60, 3), 255, np.uint8)
    out = clip_preprocess(img, image_size=32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 5, 5], (1.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)
    gray = rng.integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    g = clip_preprocess(gray, image_size=28)  # same size: only normalisation and channel repeat
    np.testing.assert_allclose(
        g[0, ..., 1] * CLIP_STD[1] + CLIP_MEAN[1], gray[0] / 255.0, atol=2e-6
    )
    # center crop: a wide image keeps its middle
    wide = np.zeros((1, 10, 30, 3), np.float32)
    wide[:, :, 10:20] = 1.0
    w = clip_preprocess(wide, image_size=10)
    np.testing.assert_allclose(w[0, :, 3:7, 0] * CLIP_STD[0] + CLIP_MEAN[0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="expects images"):
        clip_preprocess(np.zeros((3, 3)))


def test_tfds_task_on_mock_data():
    with tfds.testing.mock_data(num_examples=50):
        task = TFDSTask("mnist", image_size=16, val_fraction=0.2)
        assert task.num_classes == 10 and task.classes[0] == "0"
        assert task.size("val") == 10 and task.size("train") == 40 and task.size("test") == 50
        b = task.batch_at(0, 8, seed=1)
        assert b["x"].shape == (8, 16, 16, 3) and b["x"].dtype == np.float32
        assert b["y"].dtype == np.int32 and b["y"].max() < 10
        np.testing.assert_array_equal(
            task.batch_at(3, 8, seed=1)["y"], task.batch_at(3, 8, seed=1)["y"]
        )
        sizes = [len(x["y"]) for x in task.eval_batches(16, split="val")]
        assert sizes == [10]
        # train and val never share an example
        assert not set(task._index["train"]) & set(task._index["val"])
        with pytest.raises(ValueError, match="exceeds"):
            task.steps_per_epoch(1000)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="name='imagenet-zz' is not a known dataset"):
        TFDSTask("imagenet-zz")


def test_images_of_different_sizes_are_preprocessed_one_shape_at_a_time():
    """DTD's images vary in size (so do its mock images): a batch mixes shapes."""
    with tfds.testing.mock_data(num_examples=12):
        task = TFDSTask("dtd", image_size=16, val_fraction=0.25)
        rows = task._indices("test")[:6]
        raw = [np.asarray(task._test[int(i)]["image"]) for i in rows]
        assert len({r.shape for r in raw}) > 1  # the case this test is about
        got = task._read("test", rows)["x"]
        assert got.shape == (6, 16, 16, 3)
        for g, r in zip(got, raw, strict=True):  # each equals its own preprocessing, in order
            np.testing.assert_allclose(g, clip_preprocess(r[None], 16)[0], atol=1e-6)
