"""The Python examples in the docs run as written."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_api_example_runs(capsys):
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "1234" in out
