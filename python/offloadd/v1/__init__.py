"""Generated stubs for the ``offloadd.v1`` proto package (``python gen_proto.py``; do not edit)."""
