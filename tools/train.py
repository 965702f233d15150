#!/usr/bin/env python
"""Train a timm model from a YAML config, on one process or many (see s4nd_vision.train).

    python tools/train.py --config configs/imagenet/convnext_s4nd_tiny.yaml data.root=/data/imagenet
    accelerate launch --multi_gpu --num_processes 8 tools/train.py --config ... [--resume]
"""
from s4nd_vision.utils.runtime import keep_freed_memory
from s4nd_vision.train.cli import main

if __name__ == '__main__':
    keep_freed_memory()  # reuse freed memory instead of page-faulting it in again (CPU speed)
    main()
