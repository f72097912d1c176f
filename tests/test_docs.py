"""Every Python block of the README and of the pages under docs/ runs on its own.

Each ```python or ```py block is executed alone, in a fresh namespace, from a scratch folder:
a block that leans on an earlier one's names fails here. A block preceded by a
``<!-- skip: why -->`` line is not run (an illustration, or a long run that another test
runs with smaller sizes); the reason is required. The pages of RUN_ELSEWHERE have a test of
their own that runs their blocks as written and checks what they compute; they are not run
twice.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"<!--\s*skip(?::\s*(.*?))?\s*-->\s*$")
README_MAX_LINES = 200
RUN_ELSEWHERE = {
    "docs/dann.md": "tests/losses/test_dann.py",
    "docs/data-mixtures.md": "tests/data/test_mixture.py",
    "docs/embedded-foundation.md": "tests/data/test_embedded.py",
    "docs/logit-fusion.md": "tests/losses/test_logit_fusion.py",
    "docs/logit-swap.md": "tests/losses/test_logit_swap.py",
    "docs/nnx.md": "tests/test_nnx.py",
    "docs/prd.md": "tests/losses/test_relation.py",
}


def _blocks(page: Path):
    """``(index, code, skip_reason)`` of the page's Python blocks, in order."""
    text = page.read_text()
    found = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        reason = None if skip is None else (skip.group(1) or "")
        found.append((len(found), m.group(2), reason))
    return found


def _cases():
    for page in PAGES:
        for index, code, reason in _blocks(page):
            name = page.relative_to(ROOT).as_posix()
            if name in RUN_ELSEWHERE:
                reason = reason or f"run by {RUN_ELSEWHERE[name]}"
            marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
            yield pytest.param(page, index, code, reason, id=f"{name}:{index}", marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize("page, index, code, reason", list(_cases()))
def test_block_runs_alone(page, index, code, reason, tmp_path, monkeypatch):
    assert reason is None, f"{page.name} block {index}: a skip needs a reason (<!-- skip: why -->)"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.relative_to(ROOT)} block {index}", "exec"), {"__name__": "__doc__"})


def test_blocks_are_found(tmp_path):
    """The fence pattern sees both spellings, and the README carries its tour."""
    sample = (
        "x\n```py\na = 1\n```\n<!-- skip: shown only -->\n```python\nb = 2\n```\n```bash\nc\n```\n"
    )
    page = tmp_path / "sample.md"
    page.write_text(sample)
    assert _blocks(page) == [(0, "a = 1\n", None), (1, "b = 2\n", "shown only")]
    assert any("merging.ties" in code for _, code, _ in _blocks(ROOT / "README.md"))


@pytest.mark.parametrize("page, test", sorted(RUN_ELSEWHERE.items()))
def test_pages_run_elsewhere_are(page, test):
    assert (ROOT / page).exists(), page
    assert page in (ROOT / test).read_text(), f"{test} does not run {page}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; guides belong under docs/"
