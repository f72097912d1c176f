"""Peak memory of merging safetensors checkpoints: streaming vs loading every model.

Generates a base and T fine-tuned checkpoints with ViT-like tensor shapes (``--size-mb`` each),
then merges them in fresh subprocesses and reports each one's peak RSS above its RSS after imports
(``VmHWM`` reset through ``/proc/self/clear_refs``) next to
the bytes on disk. Streaming holds one tensor of each file at a time, so its peak is the
Python/numpy baseline plus a few tensors; the in-memory merge holds all T+1 models.

Command::

    python -m experiments.benchmarks.streaming_merge_bench --size-mb 300 --T 4

Runtime: about a minute at the default size (most of it writing the inputs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from experiments._common import format_table

_CHILD = r"""
import json, sys, time
import numpy as np
from cljax import safetensors as st
from cljax.merging._streaming import merge_safetensors

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

mode, method, base, out, *fts = sys.argv[1:]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) after the imports
start = status("VmRSS")
t0 = time.perf_counter()
if mode == "stream":
    merge_safetensors(base, fts, out, method=method, scale=0.3)
else:  # load everything, then merge in memory
    b = st.load(base)
    models = [st.load(f) for f in fts]
    merged = {k: (b[k].astype(np.float32) + 0.3 * sum(m[k].astype(np.float32) - b[k].astype(np.float32) for m in models)).astype(b[k].dtype) for k in b}
    st.save(out, merged)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "start_rss_mb": start, "peak_rss_mb": status("VmHWM")}))
"""


def _layout(size_mb: float) -> list[tuple[str, tuple[int, ...]]]:
    d, blocks = 768, []
    per_block = [
        ("attn.qkv.weight", (3 * d, d)),
        ("attn.out.weight", (d, d)),
        ("mlp.fc1.weight", (4 * d, d)),
        ("mlp.fc2.weight", (d, 4 * d)),
        ("ln1.weight", (d,)),
        ("mlp.fc1.bias", (4 * d,)),
    ]
    block_bytes = sum(int(np.prod(s)) for _, s in per_block) * 4
    n = max(1, int(size_mb * 2**20 // block_bytes))
    for i in range(n):
        blocks += [(f"blocks.{i}.{k}", s) for k, s in per_block]
    return blocks


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mb", type=float, default=300.0)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties"])
    p.add_argument("--skip-in-memory", action="store_true")
    args = p.parse_args(argv)
    from cljax import safetensors as st

    rng = np.random.default_rng(0)
    layout = _layout(args.size_mb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {k: rng.normal(size=s).astype(np.float32) for k, s in layout}
        st.save(tmp / "base.safetensors", base)
        files = []
        for t in range(args.T):
            files.append(tmp / f"ft{t}.safetensors")
            w = st.SafetensorsWriter(files[-1], [(k, v.shape, v.dtype) for k, v in base.items()])
            for k, v in base.items():
                w.write(k, v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32))
            w.close()
        del base
        file_mb = (tmp / "base.safetensors").stat().st_size / 2**20
        run = lambda code, *a: json.loads(
            subprocess.run(
                [sys.executable, "-c", code, *a], check=True, capture_output=True, text=True
            ).stdout
        )
        largest = max(int(np.prod(s)) for _, s in layout) * 4 / 2**20
        rows = []
        modes = ["stream"] + ([] if args.skip_in_memory else ["memory"])
        for mode in modes:
            r = run(
                _CHILD,
                mode,
                args.method,
                str(tmp / "base.safetensors"),
                str(tmp / f"out-{mode}.safetensors"),
                *map(str, files),
            )
            rows.append(
                {
                    "merge": f"{args.method} ({'streaming' if mode == 'stream' else 'all models in memory'})",
                    "T": args.T,
                    "checkpoint MB": file_mb,
                    "inputs MB": file_mb * (args.T + 1),
                    "RSS after imports MB": r["start_rss_mb"],
                    "peak RSS MB": r["peak_rss_mb"],
                    "peak above start MB": r["peak_rss_mb"] - r["start_rss_mb"],
                    "largest tensor MB": largest,
                    "seconds": r["seconds"],
                }
            )
    print(format_table(rows, floatfmt=".0f"))
    return rows


if __name__ == "__main__":
    main()
