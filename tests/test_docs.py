"""The Python examples in the docs run as written."""

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_api_example_runs(capsys):
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "1234" in out and "input-exhausted" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="the live example needs root (hint)")
def test_api_live_example_runs(capsys):
    from udamon.primitives.hint import hint_available

    ok, why = hint_available()
    if not ok:
        pytest.skip(f"hint unavailable: {why}")
    text = (DOCS / "api.md").read_text()
    (code,) = re.findall(r"```python live\n(.*?)```", text, re.S)
    exec(compile(code, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("duration")  # the session ran its 3 s
    assert sum(1 for line in out if "regions accessed" in line) >= 20  # 100 ms intervals
