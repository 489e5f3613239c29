"""The README's fenced code blocks, for the tests that run its examples as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def code_blocks(language: str) -> list[str]:
    """The README's fenced blocks of `language` ("" for plain ones), in order."""
    blocks, current, kind = [], None, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```") and current is None:
            current, kind = [], line[3:].strip()
        elif line.startswith("```"):
            if kind == language:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def bash_lines(containing: str) -> list[str]:
    """The non-empty lines of the first bash block that contains `containing`."""
    block = next(b for b in code_blocks("bash") if containing in b)
    return [line for line in block.splitlines() if line.strip()]
