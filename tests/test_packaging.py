"""The package installs with cljax.kernels mapped from kernels/ (setup.cfg lists packages)."""

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _listed_packages():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_setup_cfg_lists_every_package():
    on_disk = {"cljax.kernels"}
    for top in ("cljax", "experiments"):  # the experiments ship too (CLIs, build_pool)
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix()
            on_disk.add(rel.replace("/", "."))
    for init in (ROOT / "kernels").rglob("*/__init__.py"):  # kernels/ installs as cljax.kernels
        rel = init.parent.relative_to(ROOT / "kernels").as_posix()
        on_disk.add("cljax.kernels." + rel.replace("/", "."))
    assert on_disk == _listed_packages()


@pytest.mark.slow
def test_wheel_contains_kernels_as_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("cljax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cljax/kernels/__init__.py" in names
    assert "cljax/tree.py" in names
    assert {"cljax/sharding/__init__.py", "cljax/py.typed", "experiments/merging.py"} <= set(names)
    assert "cljax/models/embedded/miniclip/model.safetensors" in names  # the embedded model
    # import from the wheel alone, away from the source tree
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run(
        [sys.executable, "-c", "import cljax, cljax.kernels; print(cljax.kernels.__file__)"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(site) in out.stdout
    # the experiments run from the wheel too, away from the checkout
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    cli = [sys.executable, "-m", "experiments.merging", "--help"]
    out = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert "--preset" in out.stdout
    where = [sys.executable, "-c", "import experiments.merging as m; print(m.__file__)"]
    out = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str(site))
