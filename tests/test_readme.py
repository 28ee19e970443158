"""Every ```python block of README.md runs, as written but for the sizes in SHRINK, so the examples cannot rot.

Each block runs alone, in a fresh namespace, in a temporary folder (a block writes "ckpt/"):
a reader can copy any one of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# The README's sizes are the upstream example's (dim 512, depth 8, 512-token segments);
# these replacements, applied to the text of every block, make the same code run in seconds.
SHRINK: dict[str, str] = {
    "depth=8": "depth=1",
    "memory_layers=[6, 7, 8]": "memory_layers=[1]",
    "cmem_len=128": "cmem_len=8",
    "2049": "33",  # tokens of a 2-segment row, the reference's wrapper: 2 * seq_len + 1
    "1024": "32",
    "512": "16",  # dim, seq_len, mem_len and the slices of tokens
}


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of README.md."""
    text = README.read_text()
    return [(text.count("\n", 0, match.start()) + 1, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)]


def shrink(code: str) -> str:
    for big, small in SHRINK.items():
        code = code.replace(big, small)
    return code


def test_the_readme_has_python_blocks_and_every_replacement_is_used():
    blocks = [code for _, code in python_blocks()]
    assert len(blocks) >= 6, f"found {len(blocks)} python blocks in README.md"
    unused = [big for big in SHRINK if not any(big in code for code in blocks)]
    assert not unused, f"SHRINK entries no README block contains (remove them): {unused}"


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda value: f"line {value}" if isinstance(value, int)
                         else "")
def test_readme_block_runs(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = shrink(code)
    exec(compile(small, f"README.md, block at line {line}", "exec"), {"__name__": f"readme_line_{line}"})
    if "error.get()" in code:  # the checkify example prints the message it promises in its comment
        assert "token ids must lie in [0, num_tokens=256) (traced call)" in capsys.readouterr().out
