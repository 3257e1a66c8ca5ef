"""The fenced code blocks of the Markdown docs, for the tests that run them.

A block is a fenced region  ```INFO ... ```  at the start of a line. The first
word of INFO is its language (``python``, ``bash``, ``console``, ``text``);
further words are tags, such as ``notest`` or ``notest-cluster``, that say
why a test does not run the block.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: its info string, its text and the line of its opening fence."""

    info: str
    code: str
    line: int

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self.info.split()[1:])

    def where(self, doc: Path) -> str:
        return f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}:{self.line}"


def fenced(doc: Path) -> list[Block]:
    """Every fenced block of ``doc``, in order."""
    text = doc.read_text(encoding="utf-8")
    return [Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def blocks(doc: Path) -> list[tuple[str, str]]:
    """``(info string, code)`` of every fenced block of ``doc``, in order."""
    return [(b.info, b.code) for b in fenced(doc)]


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, as argument lists.

    Lines ending in a backslash continue; comments are dropped; ``&&``, ``;``
    and a trailing ``&`` separate commands. Pipes, redirections and
    substitutions are not split out (their pieces stay in the arguments):
    the tests only run commands without them.
    """
    text = re.sub(r"\\\n", " ", code)
    out: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", ";", "&"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out
