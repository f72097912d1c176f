"""The model pool of ``experiments.atlas``: the merging experiment's fine-tuned pool adapted to
aTLAS (heads padded to one width, a control task for negation), or a stand-in pool built here
(a ViT pretrained on upright digits, fine-tuned on domain-shifted copies)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import tree as ct
from cljax.merging import task_vector
from experiments._common import progress

if TYPE_CHECKING:
    from experiments.atlas import Config


class Pool(NamedTuple):
    """What the experiment needs from the merging pool."""

    tasks: list  # cljax.data.Task, one per fine-tuned model
    encode: Callable  # encode(encoder_params, x) -> features
    head_apply: Callable  # head_apply(head_params, features) -> logits
    pretrained: Any  # θ0 of the encoder
    task_vectors: Any  # stacked τ_t = θ_t - θ0 (encoder only)
    heads: list  # frozen head of each task
    control: Any  # (Task, head) of the control task for negation


def load_pool(cfg: Config, out_dir: Path, *, draw_workers: int | None = None) -> Pool:
    """The fine-tuned pool of ``experiments.merging`` (its ``build_pool`` and checkpoint cache).

    Falls back to a stand-in pool built by the same recipe (:func:`standin_pool`) on a
    checkout without the merging experiment. ``draw_workers`` overrides the merging preset's
    processes that draw the benchmark (1 inside a worker process, which may not start its
    own; the images are the same).
    """
    try:
        from experiments import merging as merging_exp
    except ImportError:
        merging_exp = None
    if merging_exp is None or not hasattr(merging_exp, "build_pool"):
        print("experiments.merging.build_pool is not available: using the stand-in pool")
        pool_dir = Path(cfg.pool_dir) if cfg.pool_dir else out_dir / "pool"
        return standin_pool(pool_dir, tiny=cfg.preset == "tiny")
    # The merging preset of the same name: MiniCLIP on the embedded benchmark ("default",
    # "tiny") or the ViT pretrained on digits ("digits", "digits-tiny").
    mcfg = merging_exp.PRESETS[cfg.preset]
    if draw_workers is not None:
        mcfg = dataclasses.replace(mcfg, workers=draw_workers)
    pool_dir = Path(cfg.pool_dir or mcfg.out)
    mp = merging_exp.build_pool(mcfg, pool_dir)
    return _as_pool(mp)


def _as_pool(mp: Any) -> Pool:
    """Adapts ``experiments.merging.Pool``: heads padded to one width (padded logits -1e9,
    probability 0) so that one compiled step serves every task. The control task of
    negation is the embedded benchmark's control task with its zero-shot head, or on the
    digit benchmark the pretraining (source) task with a linear head fitted on θ0's features."""
    src = mp.source
    width = max(src.num_classes, *(t.num_classes for t in mp.tasks))

    def pad(h):
        c = h["kernel"].shape[1]
        return {
            "kernel": jnp.pad(h["kernel"], ((0, 0), (0, width - c))),
            "bias": jnp.pad(h["bias"], (0, width - c), constant_values=-1e9),
        }

    encode = lambda p, x: mp.encoder.apply({"params": p}, x)
    head_apply = lambda h, f: f @ h["kernel"] + h["bias"]
    heads = [pad(mp.heads[t.name]) for t in mp.tasks]
    if src.name in mp.heads:  # the embedded control task: its zero-shot head
        control_head = pad(mp.heads[src.name])
    else:
        feats = jax.jit(encode)(mp.pretrained, src.x_train)
        control_head = pad(_fit_linear(feats, src.y_train, src.num_classes))
    return Pool(
        list(mp.tasks),
        encode,
        head_apply,
        mp.pretrained,
        ct.stack(list(mp.task_vectors)),
        heads,
        (src, control_head),
    )


def _fit_linear(feats, labels, num_classes: int, steps: int = 300, l2: float = 1e-3) -> dict:
    """A multinomial logistic-regression head (Adam, full batch, deterministic)."""
    d = feats.shape[-1]
    head = {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}
    tx = optax.adam(1e-2)

    def loss(h):
        logits = feats @ h["kernel"] + h["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + 0.5 * l2 * jnp.sum(h["kernel"] ** 2)

    @jax.jit
    def run(h):
        def body(carry, _):
            h, opt = carry
            upd, opt = tx.update(jax.grad(loss)(h), opt, h)
            return (optax.apply_updates(h, upd), opt), None

        return jax.lax.scan(body, (h, tx.init(h)), None, length=steps)[0][0]

    return run(head)


DOMAINS = ("rot90", "invert", "hflip", "noise", "checker")


def _domain(name: str, x: np.ndarray) -> np.ndarray:
    """A fixed domain shift of [N, 28, 28] digits in [0, 1]."""
    if name == "rot90":
        return np.rot90(x, 1, axes=(1, 2))
    if name == "invert":
        return 1.0 - x
    if name == "hflip":
        return x[:, :, ::-1]
    if name == "noise":
        g = np.random.default_rng(123).normal(0, 0.35, size=x.shape[1:]).astype(x.dtype)
        return np.clip(x + g, 0, 1)  # one fixed noise pattern: a learnable domain
    if name == "checker":
        yy, xx = np.mgrid[:28, :28]
        board = (((yy // 4) + (xx // 4)) % 2).astype(x.dtype)
        return np.clip(0.6 * x + 0.4 * board, 0, 1)
    raise ValueError(f"unknown domain {name!r}")


def standin_pool(directory: Path, *, tiny: bool = False) -> Pool:
    """A small pool built here: a ViT pretrained on upright MNIST-5k digits (θ0 and its
    frozen head), fine-tuned on five domain-shifted copies of held-out digits (encoder
    only, head frozen, as in the reference). Cached with ``CheckpointManager``.
    """
    from cljax.checkpoint import CheckpointManager
    from cljax.data import Task, load_mnist5k, split_train_val
    from cljax.models import ViT

    x, y = load_mnist5k()
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    n_base = 2000
    classes = tuple(str(i) for i in range(10))

    def make_task(name, xs, ys, n_test):
        (xtr, ytr), (xva, yva) = split_train_val(xs[n_test:], ys[n_test:], fraction=0.15)
        return Task(
            name,
            classes,
            xtr[..., None],
            ytr,
            xva[..., None],
            yva,
            xs[:n_test, ..., None],
            ys[:n_test],
        )

    base = make_task("upright", x[:n_base], y[:n_base], 500)
    rest_x, rest_y = x[n_base:], y[n_base:]
    domains = DOMAINS[:3] if tiny else DOMAINS
    tasks = []
    for i, d in enumerate(domains):
        p = np.random.default_rng([1, i]).permutation(len(rest_y))
        tasks.append(make_task(d, _domain(d, rest_x[p]).copy(), rest_y[p], 1000))

    model = ViT(
        patch_size=7,
        hidden_dim=48 if tiny else 64,
        depth=2,
        num_heads=4,
        mlp_dim=96 if tiny else 128,
    )
    head_mod = nn.Dense(10)
    enc0 = model.init(jax.random.key(0), base.x_train[:1])
    head0 = head_mod.init(jax.random.key(1), jnp.zeros((1, model.hidden_dim)))
    encode = lambda p, xb: model.apply(p, xb)
    head_apply = lambda h, f: head_mod.apply(h, f)
    pre_steps, ft_steps = (60, 40) if tiny else (600, 300)

    target = {"encoder": enc0, "head": head0, "finetuned": [enc0] * len(domains)}
    mgr = CheckpointManager(directory, keep=1)
    restored = mgr.restore_latest(target)
    if restored is not None and restored[2].get("domains") == list(domains):
        tree = restored[1]
    else:
        tree = _train_pool(model, encode, head_apply, enc0, head0, base, tasks, pre_steps, ft_steps)
        mgr.save(0, tree, metadata={"domains": list(domains)})
    pretrained = tree["encoder"]

    taus = ct.stack([task_vector(ft, pretrained) for ft in tree["finetuned"]])
    return Pool(
        tasks,
        encode,
        head_apply,
        pretrained,
        taus,
        [tree["head"]] * len(tasks),
        (base, tree["head"]),
    )


def _train_pool(model, encode, head_apply, enc0, head0, base, tasks, pre_steps, ft_steps):
    def ce(enc, head, b):
        logits = head_apply(head, encode(enc, b["x"]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    def trainer(loss, steps, lr):
        tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.1)

        @jax.jit
        def step(params, opt, b):
            upd, opt = tx.update(jax.grad(loss)(params, b), opt, params)
            return optax.apply_updates(params, upd), opt

        def train(params, task, seed, extra):
            opt = tx.init(params)
            for s in progress(range(steps), desc=f"pool: {task.name}"):
                params, opt = step(params, opt, {**task.batch_at(s, 64, seed=seed), **extra})
            return params

        return train

    pretrain = trainer(lambda p, b: ce(p["encoder"], p["head"], b), pre_steps, 2e-3)
    both = pretrain({"encoder": enc0, "head": head0}, base, 0, {})
    enc, head = both["encoder"], both["head"]
    # Fine-tune the encoder only, the pretrained head frozen (the reference's recipe); the head
    # travels in the batch, so one compiled step serves every task.
    finetune = trainer(lambda p, b: ce(p, b["head"], b), ft_steps, 1e-3)
    finetuned = [finetune(enc, t, i + 1, {"head": head}) for i, t in enumerate(tasks)]
    return {"encoder": enc, "head": head, "finetuned": finetuned}
