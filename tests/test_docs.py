"""Executes the Python blocks of the README's API tour, so the documented API stays true."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    tour = text.split("## API tour", 1)[1]
    return re.findall(r"```python\n(.*?)```", tour, flags=re.S)


def test_readme_api_tour_runs():
    blocks = _blocks()
    assert blocks, "the README's API tour has no python blocks"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
