#!/usr/bin/env python
"""`s4nd-vision gpu-check` from a checkout, with the same arguments (see s4nd_vision.cli, or --help)."""
from functools import partial

from s4nd_vision.cli import tool_main

main = partial(tool_main, 'gpu-check')

if __name__ == '__main__':
    main()
