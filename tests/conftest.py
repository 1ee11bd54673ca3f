import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_udamon(*args: str, check: bool = False, timeout: float = 120, **kw):
    """Run the real CLI in a subprocess (as a user would)."""
    p = subprocess.run([sys.executable, "-m", "udamon", *args], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"udamon {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture
def udamon():
    return run_udamon
