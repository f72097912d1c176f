"""MkDocs hooks of the documentation site (``make docs``).

* The README is the site's home page and the CHANGELOG one of its pages: links of the README
  into ``docs/`` become links between pages; links to other files of the repository point at
  the repository.
* The API reference reads the source as installed: ``kernels/`` is the subpackage
  ``cljax.kernels``, which a reader of the source tree cannot see. ``build/api-src/cljax``
  holds the Python files of ``cljax/`` with those of ``kernels/`` copied in as
  ``cljax/kernels``, and mkdocstrings reads that.
"""

import re
import shutil
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
API_SRC = ROOT / "build" / "api-src"


def _page(text: str, repo: str) -> str:
    text = text.replace("](CHANGELOG.md)", "](changelog.md)")
    text = re.sub(
        r"\]\((?!https?://|#|docs/|changelog\.md)([^)]+)\)", rf"]({repo}/blob/main/\1)", text
    )
    return text.replace("](docs/", "](")


def on_config(config):
    shutil.rmtree(API_SRC, ignore_errors=True)
    for src, dst in (
        (ROOT / "cljax", API_SRC / "cljax"),
        (ROOT / "kernels", API_SRC / "cljax" / "kernels"),
    ):
        for path in src.rglob("*.py"):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return config


def on_files(files, config):
    repo = config["repo_url"].rstrip("/")
    for name, src in (("index.md", "README.md"), ("changelog.md", "CHANGELOG.md")):
        text = _page((ROOT / src).read_text(), repo)
        files.append(File.generated(config, name, content=text))
    return files
