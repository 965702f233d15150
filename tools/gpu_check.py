#!/usr/bin/env python
"""`s4nd-vision gpu-check` from a checkout, with the same arguments (see s4nd_vision.cli, or --help). It imports the
checkout's package, installed or not (a GPU machine may get a copy of the tree and nothing else)."""
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s4nd_vision.cli import tool_main  # noqa: E402

main = partial(tool_main, 'gpu-check')

if __name__ == '__main__':
    main()
