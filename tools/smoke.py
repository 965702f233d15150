#!/usr/bin/env python
"""Smoke run: create convnext_s4nd_tiny with timm and run it at two resolutions (see s4nd_vision.bench.smoke)."""
from s4nd_vision.bench.smoke import main

if __name__ == '__main__':
    main()
