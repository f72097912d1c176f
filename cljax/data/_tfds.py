"""Tasks over TFDS datasets through ``tfds.data_source`` (array_record; no TensorFlow needed).

A :class:`TFDSTask` has the interface of :class:`cljax.data.Task` (``batch_at``, ``batches``,
``eval_batches``, ``steps_per_epoch``, ``classes``) but reads records lazily by index and
preprocesses each batch, so datasets larger than memory work. The validation split is held
out of the train split as in the papers' code (10 %, at most 5 000 images, seed 0: the
``split_train_into_train_val`` of github.com/mlfoundations/task_vectors); hyperparameters
are chosen on it, never on test.

Images go through CLIP's preprocessing (:func:`clip_preprocess`): resize the shorter side to
``image_size`` (bicubic), center-crop, scale to [0, 1] and normalise with CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CLIP_MEAN", "CLIP_STD", "DATASETS", "TFDSTask", "clip_preprocess", "tfds_task"]

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class _Spec:
    tfds_name: str
    train: str = "train"
    test: str = "test"
    image_key: str = "image"
    label_key: str = "label"


# The 8-task CLIP benchmark and the MTIL datasets, by the names the papers use. GTSRB is not
# in the TFDS catalogue: prepare it as a TFDS dataset named "gtsrb" under --data_dir.
DATASETS: dict[str, _Spec] = {
    "cars": _Spec("cars196"),
    "dtd": _Spec("dtd"),
    "eurosat": _Spec("eurosat/rgb", test="train[80%:]", train="train[:80%]"),
    "gtsrb": _Spec("gtsrb"),
    "mnist": _Spec("mnist"),
    "resisc45": _Spec("resisc45", test="train[80%:]", train="train[:80%]"),
    "sun397": _Spec("sun397/standard-part1-120k"),
    "svhn": _Spec("svhn_cropped"),
    "cifar100": _Spec("cifar100"),
    "caltech101": _Spec("caltech101"),
    "flowers": _Spec("oxford_flowers102"),
    "food": _Spec("food101", test="validation"),
    "pets": _Spec("oxford_iiit_pet"),
    "aircraft": _Spec("fgvc_aircraft"),
    "imagenet_r": _Spec("imagenet_r", train="test[:80%]", test="test[80%:]"),
}


def clip_preprocess(images: np.ndarray, image_size: int = 224) -> np.ndarray:
    """CLIP's eval transform on a batch ``[N, H, W, C]`` (uint8 or float in [0, 1]).

    Grayscale inputs are repeated to 3 channels. Resizing is bicubic with antialiasing
    (``jax.image.resize``); PIL's bicubic differs by a few 1e-3 in pixel value.

    Returns:
      float32 ``[N, image_size, image_size, 3]``.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"clip_preprocess expects images [N, H, W, C], got shape {x.shape}")
    x = x.astype(np.float32) / (255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    s = image_size / min(h, w)
    nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
    y = jax.image.resize(jnp.asarray(x), (n, nh, nw, c), "bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    y = jnp.clip(y[:, top : top + image_size, left : left + image_size], 0.0, 1.0)
    return np.asarray((y - CLIP_MEAN) / CLIP_STD, np.float32)


class TFDSTask:
    """A classification task read lazily from a TFDS ``data_source``.

    Args:
      name: a key of :data:`DATASETS` (``"eurosat"``) or ``"tfds:<tfds name>"``.
      data_dir: where the prepared TFDS datasets are (``--data_dir``).
      image_size: side of the preprocessed images.
      val_fraction, max_val, seed: the held-out validation part of the train split.
      preprocess: ``images -> array``; default :func:`clip_preprocess` at ``image_size``.
      max_train: use only the first ``max_train`` training examples (after the val split).

    Raises:
      ValueError: for an unknown dataset name (listing the known ones).
    """

    def __init__(
        self,
        name: str,
        *,
        data_dir: str | None = None,
        image_size: int = 224,
        val_fraction: float = 0.1,
        max_val: int = 5000,
        seed: int = 0,
        preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
        max_train: int | None = None,
    ):
        import tensorflow_datasets as tfds

        if name.startswith("tfds:"):
            spec = _Spec(name[5:])
        elif name in DATASETS:
            spec = DATASETS[name]
        else:
            raise ValueError(
                f"name={name!r} is not a known dataset; known: {sorted(DATASETS)} or 'tfds:<name>'"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{val_fraction=} must be in (0, 1)")
        self.name = name
        self.spec = spec
        # One split each: a random-access source (the stubs' return type covers split lists).
        self._train = cast(
            Any, tfds.data_source(spec.tfds_name, split=spec.train, data_dir=data_dir)
        )
        self._test = cast(Any, tfds.data_source(spec.tfds_name, split=spec.test, data_dir=data_dir))
        features = self._train.dataset_info.features
        label = features[spec.label_key]
        self.classes = (
            tuple(label.names)
            if getattr(label, "names", None)
            else tuple(str(i) for i in range(label.num_classes))
        )
        n = len(self._train)
        n_val = min(int(round(n * val_fraction)), max_val)
        if n_val < 1 or n_val >= n:
            raise ValueError(
                f"{name}: cannot hold out {n_val} of {n} training examples for validation"
            )
        perm = np.random.default_rng(seed).permutation(n)
        train_idx = np.sort(perm[n_val:])
        if max_train is not None:
            train_idx = train_idx[:max_train]
        self._index = {
            "train": train_idx,
            "val": np.sort(perm[:n_val]),
            "test": np.arange(len(self._test)),
        }
        self._preprocess = preprocess or (lambda x: clip_preprocess(x, image_size))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def size(self, split: str) -> int:
        return len(self._indices(split))

    def _indices(self, split: str) -> np.ndarray:
        if split not in self._index:
            raise ValueError(f"{split=} must be 'train', 'val' or 'test'")
        return self._index[split]

    def _read(self, split: str, rows: np.ndarray) -> dict:
        source = self._test if split == "test" else self._train
        records = [source[int(i)] for i in rows]
        images = [np.asarray(r[self.spec.image_key]) for r in records]
        labels = np.asarray([int(r[self.spec.label_key]) for r in records], np.int32)
        return {"x": self._preprocess_each(images), "y": labels}

    def _preprocess_each(self, images: list[np.ndarray]) -> np.ndarray:
        """Preprocesses images of any sizes (most datasets vary): one call per distinct shape,
        the results put back in order."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        if len(by_shape) == 1:
            return self._preprocess(np.stack(images))
        out: list[Any] = [None] * len(images)
        for idx in by_shape.values():
            ys = self._preprocess(np.stack([images[i] for i in idx]))
            for i, y in zip(idx, ys, strict=True):
                out[i] = y
        return np.stack(out)

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        n = self.size(split)
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        if batch_size > n:
            raise ValueError(
                f"task {self.name!r}: {batch_size=} exceeds the {n} examples of {split}"
            )
        return n // batch_size

    def batch_at(self, step: int, batch_size: int, *, seed: int = 0, split: str = "train") -> dict:
        """The batch of a shuffled drop-remainder stream at global ``step`` (random access)."""
        idx = self._indices(split)
        spe = self.steps_per_epoch(batch_size, split)
        epoch, i = divmod(int(step), spe)
        perm = np.random.default_rng([seed, epoch]).permutation(len(idx))
        return self._read(split, idx[np.sort(perm[i * batch_size : (i + 1) * batch_size])])

    def batches(
        self, batch_size: int, *, seed: int = 0, split: str = "train", start: int = 0, steps=None
    ) -> Iterator[dict]:
        s = start
        while steps is None or s < start + steps:
            yield self.batch_at(s, batch_size, seed=seed, split=split)
            s += 1

    def eval_batches(self, batch_size: int, split: str = "test") -> Iterator[dict]:
        idx = self._indices(split)
        for i in range(0, len(idx), batch_size):
            yield self._read(split, idx[i : i + batch_size])


def tfds_task(name: str, **kwargs) -> TFDSTask:
    """Shorthand for :class:`TFDSTask`."""
    return TFDSTask(name, **kwargs)
