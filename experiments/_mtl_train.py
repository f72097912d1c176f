"""The models and the training loop of ``experiments.mtl``: the trunks, the loss of a multi-head
model, and one resumable training run with the best-validation epoch's test accuracies.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import mtl
from cljax.checkpoint import CheckpointManager
from cljax.train import TrainState

if TYPE_CHECKING:
    from experiments.mtl import Config


class MLPTrunk(nn.Module):
    """A two-layer perceptron on the flattened image (cheap on a CPU)."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16 * self.width)(x.reshape(x.shape[0], -1)))
        return nn.relu(nn.Dense(8 * self.width)(x))


class Trunk(nn.Module):
    """A LeNet-like trunk: two 5×5 convolutions with max-pooling and a dense layer."""

    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(self.width, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(
            nn.relu(nn.Conv(2 * self.width, (5, 5), padding="VALID")(x)), (2, 2), (2, 2)
        )
        return nn.relu(nn.Dense(4 * self.width)(x.reshape(x.shape[0], -1)))


class LeNet(nn.Module):
    """The Multi-MNIST LeNet of the F-MTL code (``multi-mnist/model_lenet.py`` of
    github.com/VietHoang1512/FS-MTL): a 9×9 convolution (``width`` channels), 2×2
    max-pooling, a 5×5 convolution (``2 * width``), 2×2 max-pooling and a dense layer of
    ``5 * width`` units, ReLU after each; with ``width=10`` exactly its 10-20-50 trunk."""

    width: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(self.width, (9, 9), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(
            nn.relu(nn.Conv(2 * self.width, (5, 5), padding="VALID")(x)), (2, 2), (2, 2)
        )
        return nn.relu(nn.Dense(5 * self.width)(x.reshape(x.shape[0], -1)))


TRUNKS = {"mlp": MLPTrunk, "conv": Trunk, "lenet": LeNet}


def _reseed(opt_state, seed: int):
    """``opt_state`` with the key of every :class:`cljax.mtl.AggregateState` in it set from
    ``seed``: one optimiser (so one compiled step) serves every seed of a variant."""
    return jax.tree.map(
        lambda s: s._replace(key=jax.random.key(seed)) if isinstance(s, mtl.AggregateState) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, mtl.AggregateState),
    )


def make_loss(model: nn.Module, task_ids: tuple[int, ...]):
    ids = jnp.asarray(task_ids)

    def loss_fn(params, batch, model_state):
        logits = model.apply({"params": params}, batch["x"])
        return mtl.classification_losses(logits, batch["y"][:, ids]), model_state

    return loss_fn


def train_one(
    cfg: Config,
    tasks,
    task_ids,
    step_fn,
    predict,
    model,
    seed: int,
    *,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    tx=None,
) -> dict:
    """Trains one model; returns test accuracies at the epoch of best mean val accuracy.

    With ``checkpoint_dir`` the whole run (train state with its PRNG key and method states,
    the step, the best epoch's accuracies so far) is saved after every epoch, and with
    ``checkpoint_every`` also every that many steps; a re-run with the same folder resumes
    and returns what an uninterrupted run returns, bit for bit (on CPU). ``tx`` is the
    optimiser (default Adam at ``cfg.learning_rate``), e.g. a chain starting with
    ``mtl.aggregate``.
    """
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int | np.integer):
            raise ValueError(f"train_one: {checkpoint_every=} must be a positive int or None")
        if checkpoint_every < 1:
            raise ValueError(f"train_one: {checkpoint_every=} must be a positive int or None")
        if checkpoint_dir is None:
            raise ValueError(f"train_one: {checkpoint_every=} needs a checkpoint_dir")
    sub = [tasks[i] for i in task_ids]
    x0 = jnp.asarray(sub[0].x_train[:2])
    params = model.init(jax.random.key(seed), x0)["params"]
    tx = optax.adam(cfg.learning_rate) if tx is None else tx
    state = TrainState.create(params, tx, key=seed, methods={"model_state": {}})
    state = state.replace(opt_state=_reseed(state.opt_state, seed))
    spe = sub[0].steps_per_epoch(cfg.batch_size)
    best_val, best_test = -1.0, None
    start, ckpt = 0, None
    if checkpoint_dir is not None:
        ckpt = CheckpointManager(checkpoint_dir, keep=2)
        restored = ckpt.restore_latest(state)
        if restored is not None:
            start, state, meta = restored
            if meta.get("steps_per_epoch") != spe:
                raise ValueError(
                    f"train_one: checkpoint in {checkpoint_dir} has steps_per_epoch="
                    f"{meta.get('steps_per_epoch')}; this run has {spe} (use another folder)"
                )
            best_val = meta["best_val"]
            best_test = None if meta["best_test"] is None else np.asarray(meta["best_test"])

    def save(done: int) -> None:
        if ckpt.path(done).exists():  # one the restore skipped as corrupt: replace it
            shutil.rmtree(ckpt.path(done))
        test = None if best_test is None else [float(v) for v in best_test]
        meta = {"steps_per_epoch": spe, "best_val": float(best_val), "best_test": test}
        ckpt.save(done, state, metadata=meta)

    for epoch in range(start // spe, cfg.epochs):
        end = (epoch + 1) * spe
        for s in range(max(epoch * spe, start), end):
            b = mtl.multitask_batch(tasks, s, cfg.batch_size, seed=seed)
            b = {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"])}
            state, _ = step_fn(state, b)
            if checkpoint_every is not None and s + 1 < end and (s + 1) % checkpoint_every == 0:
                save(s + 1)
        pr = lambda x, p=state.params: predict(p, x)
        val = mtl.evaluate_accuracy(pr, sub, split="val", batch_size=len(sub[0].y_val))
        if val.mean() > best_val:
            n_test = len(sub[0].y_test)
            best_val = val.mean()
            best_test = mtl.evaluate_accuracy(pr, sub, split="test", batch_size=n_test)
        if ckpt is not None:
            save(end)
    return {
        "test": [float(v) for v in best_test],
        "best_val": float(best_val),
        "skipped": int(state.skipped),
    }
