"""The README's Python example runs as printed and generates text from SmolLM2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from daemon import REPO, Daemon

EXAMPLE_DIR = Path("/tmp/smollm2")  # the path the README example names


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- python-example:begin -->\n```python\n(.*?)```\n<!-- python-example:end -->", text, re.S)
    assert m, "README.md lost its python-example block"
    return m.group(1)


def test_readme_example_generates_text(smol_dir: Path):
    # The README converts into /tmp/smollm2; reuse the test cache's conversion there.
    if not EXAMPLE_DIR.exists():
        EXAMPLE_DIR.symlink_to(smol_dir, target_is_directory=True)
    assert (EXAMPLE_DIR / "model.safetensors").exists(), f"{EXAMPLE_DIR} is not a SmolLM2 checkpoint"
    d = Daemon([str(EXAMPLE_DIR)])
    try:
        out = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True,
                             env={**os.environ, "OFFLOADD_SOCKET": d.uds}, timeout=300)
    finally:
        assert d.stop() == 0
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is Paris"), out.stdout
