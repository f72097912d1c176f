"""Every experiment module answers ``--help``: exit 0, a help line per config field, presets.

``python -m experiments.<name> --help`` runs ``main(["--help"])`` (or ``cli`` where ``main``
is the entry point of another experiment's preset); calling it here needs no subprocess.
"""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import experiments
import experiments.benchmarks
from experiments import _common


def _modules():
    names = []
    for pkg in (experiments, experiments.benchmarks):
        for m in pkgutil.iter_modules(pkg.__path__):
            if not m.ispkg and not m.name.startswith("_"):
                names.append(f"{pkg.__name__}.{m.name}")
    return names


MODULES = _modules()


def _config_classes(module):
    return [
        v
        for k, v in vars(module).items()
        if isinstance(v, type)
        and dataclasses.is_dataclass(v)
        and v.__module__ == module.__name__
        and k.endswith("Config")
    ]


def test_every_experiment_module_is_found():
    short = {m.rsplit(".", 1)[1] for m in MODULES}
    assert {"atlas", "clip_merging", "clip_zscl", "continual", "mtl", "zscl"} <= short


@pytest.mark.parametrize("name", MODULES)
def test_help_lists_every_flag_and_preset(name, capsys, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    module = importlib.import_module(name)
    source = inspect.getsource(module)
    assert 'if __name__ == "__main__":' in source, f"{name} has no __main__ guard"
    entry = getattr(module, "cli", None) or module.main

    def help_text(*args):
        with pytest.raises(SystemExit) as exc:
            entry([*args, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:"), out[:200]
        return out

    out = help_text()
    # A module of several settings (PRESET_NAMES) lists every preset in its --help, and each
    # setting's flags in --preset NAME --help.
    names = getattr(module, "PRESET_NAMES", ())
    every = out + "".join(help_text("--preset", p) for p in names)
    for cls in _config_classes(module):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in every, f"{name}: --{f.name} missing from --help"
    for preset in [*getattr(module, "PRESETS", {}), *names]:
        assert preset in out, f"{name}: preset {preset!r} missing from --help"


def test_flag_help_comes_from_metadata_comment_or_name():
    import argparse

    @dataclasses.dataclass
    class Config:
        preset: str = "default"
        steps: int = 10  # optimiser steps per task (100 % of the data)
        # learning rate of the
        # inner loop
        lr: float = 1e-3
        tag: str = dataclasses.field(default="#x", metadata={"help": "run tag"})
        seeds: tuple[int, ...] = (0, 1)
        plot: bool = True

    parser = argparse.ArgumentParser()
    _common.add_config_flags(parser, Config, presets=["default", "tiny"])
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["steps"].startswith("optimiser steps per task")
    assert "(default: 10)" in helps["steps"]
    assert helps["lr"].startswith("learning rate of the inner loop")
    assert helps["tag"] == "run tag (default: #x)"
    assert helps["seeds"] == "seeds (default: 0 1)"
    assert "one of: default, tiny" in helps["preset"]
    assert "presets: default, tiny" in parser.epilog
    text = parser.format_help()  # argparse's %-formatting accepts every help string
    assert "optimiser steps per task (100 % of the data)" in text
    args = parser.parse_args(["--steps", "3", "--plot", "false", "--seeds", "4", "5"])
    cfg = _common.config_from_flags(Config(), args)
    assert (cfg.steps, cfg.plot, cfg.seeds, cfg.lr) == (3, False, (4, 5), 1e-3)
