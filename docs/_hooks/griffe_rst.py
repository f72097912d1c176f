"""Griffe extension of the API reference: reST habits of the docstrings, rendered as Markdown.

The docstrings are Google style with two reST habits: literal blocks introduced by ``::``
(``Example::`` then an indented block) and roles such as ``:func:`ties```. Markdown would run
the first into a paragraph and print the second as written; this extension turns them into
fenced Python blocks and inline code before mkdocstrings renders the docstrings.
"""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def markdown(text: str) -> str:
    """``text`` with its literal blocks fenced and its roles as inline code."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if not (line.rstrip().endswith("::") and j > i + 1 and j < len(lines)):
            out.append(line)
            i += 1
            continue
        base, inner = _indent(line), _indent(lines[j])
        if inner <= base:
            out.append(line)
            i += 1
            continue
        block, k = [], j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= inner):
            block.append(lines[k][inner:])
            k += 1
        while block and not block[-1].strip():
            block.pop()
            k -= 1
        head = line.rstrip()[:-2].rstrip()
        pad = " " * base
        if head.strip() in ("Example", "Examples"):
            out.append(f"{pad}**{head.strip()}:**")
        elif head.strip():
            out.append(f"{head}:")
        out += ["", f"{pad}```python", *(pad + b if b else "" for b in block), f"{pad}```"]
        i = k
    return _ROLE.sub(r"`\1`", "\n".join(out))


class ReSTLiterals(griffe.Extension):
    """Rewrites every docstring with :func:`markdown`."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
