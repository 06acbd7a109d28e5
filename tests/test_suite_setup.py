"""The test session's own set-up (tests/conftest.py) reaches the processes the tests start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.environ.get("HYDIT_PYCACHE") == "0", reason="HYDIT_PYCACHE=0 opts out")
@pytest.mark.skipif(
    sys.prefix == sys.base_prefix and not os.environ.get("PYTHONPYCACHEPREFIX"), reason="no virtual environment"
)
def test_started_processes_keep_a_bytecode_cache():
    """Without a writable bytecode cache every torchrun rank, CLI run and Ray worker compiles torch and its
    dependencies from source on import (conftest._keep_bytecode: ~2x the CPU time of a torchrun test)."""
    code = "import sys; print(sys.dont_write_bytecode, sys.pycache_prefix)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False", out
    prefix = sys.pycache_prefix
    assert out[1] == str(prefix) and (prefix is None or os.access(prefix, os.W_OK)), (out, prefix)
