"""A small continual run for tests/test_resume.py.

``python tests/_resume_child.py OUT [--checkpoint-every N] [--kill-in-save N] [--kill-at-step K]``

Three Permuted-MNIST-like tasks of 40 steps, an MLP, GPM (so projection memories are in the
checkpoints), checkpoints at every task boundary under OUT/ckpt (and every N steps with
``--checkpoint-every N``); writes OUT/results.json with the accuracy matrix and a fingerprint
of the final train state, and OUT/resumed.json with where the last run resumed.
``--kill-in-save N`` SIGKILLs the process inside the N-th checkpoint write of a run (after the
arrays are on disk, before the atomic rename); ``--kill-at-step K`` SIGKILLs it once the run's
K-th optimiser step (counted over all tasks) and its checkpoint are done. Each kill happens
once per OUT folder.
"""

import argparse
import json
import os
import signal
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import checkpoint as ckpt_mod
from cljax import continual as cl
from cljax import projection as pj
from cljax.checkpoint import tree_fingerprint
from cljax.data import Task


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, use_bias=False)(x))
        return nn.Dense(4, use_bias=False)(x)


def tasks():
    rs = np.random.default_rng(0)
    x = rs.normal(size=(400, 16)).astype(np.float32)
    w = rs.normal(size=(16, 4))
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    out = []
    for t in range(3):
        perm = np.random.default_rng(t + 1).permutation(16)
        xt = x[:, perm]
        out.append(
            Task(
                f"t{t}",
                tuple("abcd"),
                xt[:300],
                y[:300],
                xt[300:350],
                y[300:350],
                xt[350:],
                y[350:],
            )
        )
    return out


STEPS = 40


def _kill_once(flag: Path) -> None:
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=0)
    parser.add_argument("--kill-at-step", type=int, default=0)
    args = parser.parse_args()
    out = args.out
    kill_at = args.kill_in_save
    flag = out / "killed-in-save"
    if kill_at and not flag.exists():
        calls = {"n": 0}
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("manifest.json"):
                calls["n"] += 1
                if calls["n"] == kill_at:
                    _kill_once(flag)
            return real_replace(src, dst)

        ckpt_mod.os.replace = replace  # only inside cljax.checkpoint
    step_flag = out / "killed-at-step"

    def progress(steps, desc, total):
        task = int(desc.split()[-1])
        for s in steps:
            yield s  # resumes once step s (and its checkpoint) is done
            if task * STEPS + s + 1 == args.kill_at_step and not step_flag.exists():
                _kill_once(step_flag)

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    record = jax.jit(lambda p, x: pj.record_layer_inputs(model, {"params": p}, x))
    result = cl.run_sequence(
        tasks(),
        apply_fn=lambda p, x: model.apply({"params": p}, x),
        params=params,
        optimizer=optax.adam(3e-3),
        steps_per_task=STEPS,
        batch_size=16,
        methods=[cl.gpm([(r"Dense_0/kernel", True)], record, threshold=0.95, num_samples=64)],
        scenario="domain",
        checkpoint_dir=out / "ckpt",
        checkpoint_every=args.checkpoint_every,
        progress=progress,
        seed=3,
    )
    res = {
        "accuracy": np.asarray(result.accuracy).tolist(),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "state": tree_fingerprint(result.state.params),
        "opt_state": tree_fingerprint(result.state.opt_state),
    }
    (out / "results.json").write_text(json.dumps(res, indent=1))
    resumed = {"task": result.resumed_from, "step": result.resumed_at_step}
    (out / "resumed.json").write_text(json.dumps(resumed))


if __name__ == "__main__":
    main()
