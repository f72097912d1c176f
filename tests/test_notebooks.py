"""The notebooks in ``colab/``: how they install cljax, and a run of each on its tiny preset.

A notebook installs the package as a user would (``pip install`` from the repository, with a
TPU cell for JAX's TPU build) and needs no checkout: the run below executes it in an empty
folder with nothing of the source tree on ``sys.path`` beyond what the installed package
provides (``CLJAX_TINY=1``).
"""

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
REPO = "https://github.com/cljax/cljax"


def _code(path):
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_notebooks_exist_and_have_no_outputs():
    assert NOTEBOOKS, "colab/ holds no notebook"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: commit notebooks without outputs"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_installs_the_package_with_a_tpu_cell(path):
    cells = _code(path)
    install = re.compile(rf'%pip install -q "cljax(\[\w+\])? @ git\+{re.escape(REPO)}"')
    tpu = re.compile(r'%pip install -q "jax\[tpu\]>=0\.10"')
    uses = re.compile(r"^(import|from) (jax|cljax|experiments)\b", re.M)
    first_jax = next(i for i, s in enumerate(cells) if uses.search(s))
    setup = cells[:first_jax]
    assert [bool(install.search(s)) for s in setup[:1]] == [True], f"{path.name}: install cell"
    assert any(tpu.search(s) for s in setup), f"{path.name}: no TPU cell before JAX is imported"
    for s in setup:  # the installs run on Colab only: CI executes these cells as they are
        for line in s.splitlines():
            if line.lstrip().startswith(("%pip", "!")):
                assert line.startswith("    "), f"{path.name}: unguarded {line.strip()!r}"
    for s in cells:  # no checkout needed: no clone, no editable install, no walk to a root
        assert not re.search(r"git clone|pip install[^\n]* -e |os\.chdir|sys\.path", s), path.name
        magic = re.compile(r"^(\s*)[%!].*$", re.M)
        ast.parse(magic.sub(r"\1pass", s))  # each cell is Python, its IPython magics aside


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: tiny presets, no progress bars, and an empty
    # working folder outside the checkout (the notebook writes under runs/ there). cljax and
    # experiments come from the installed package alone: no PYTHONPATH into the tree.
    monkeypatch.setenv("CLJAX_TINY", "1")
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert {p.name for p in tmp_path.iterdir()} <= {"runs"}  # it wrote under runs/ only
