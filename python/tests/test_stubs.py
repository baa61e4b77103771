"""The committed stubs in offloadd/v1 are exactly what the proto generates."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gen_proto  # noqa: E402


def test_stubs_match_the_proto():
    assert gen_proto.differences() == [], "run `python python/gen_proto.py` and commit the stubs"
