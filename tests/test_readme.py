"""The README's quick start runs: the ```python blocks of its "## Quick start" section, in order,
in one namespace (the "## The library" blocks are API sketches over a model they do not build)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Quick start"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(text: str, section: str) -> list[tuple[int, str]]:
    """(line number of its first code line, code) of every ```python block of the Markdown
    ``section`` of ``text`` (from its ``## `` heading to the next one)."""
    start = text.find(f"\n{section}\n") + 1
    assert start > 0, f"no {section!r} heading in the text"
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text, start, end)]


def test_python_blocks_are_those_of_the_section_with_their_line_numbers():
    text = (
        "intro\n```python\nskipped()\n```\n## Quick start\n```python\nx = 1\n```\n\n"
        "```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n## Next\n```python\nskipped()\n```\n"
    )
    assert python_blocks(text, "## Quick start") == [(7, "x = 1\n"), (14, "y = 2\nz = 3\n")]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text("utf-8"), SECTION)
    assert len(blocks) >= 5, f"expected the quick start's ```python blocks in {README}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the blocks write their adapter directory here
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        # padded so that a traceback names README.md and the line the failing statement is on
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
