#!/usr/bin/env python
"""Export an S4ND model to ONNX with dynamic batch, height and width, then check and time the file.

    python tools/export.py convnext_s4nd_tiny --output output/convnext_s4nd_tiny.onnx --sizes 224 288x352
    python tools/export.py convnext_s4nd_tiny --checkpoint output/imagenet/convnext_s4nd_tiny/best.safetensors \
        --model-kwargs img_size=224
"""
import argparse
import json
import time

import timm
import torch
import yaml

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.deploy import export_onnx, onnx_latency


def _kwargs(items):
    """key=value strings as a dict, values read as YAML scalars (numbers, booleans, lists)."""
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'--model-kwargs expects key=value, got {item!r}')
        out[key] = yaml.safe_load(value)
    return out


def _size(text: str):
    h, _, w = text.partition('x')
    return int(h), int(w or h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='a registered model name, e.g. convnext_s4nd_tiny')
    parser.add_argument('--output', default=None, help='ONNX file (default: output/<model>.onnx)')
    parser.add_argument('--checkpoint', default=None, help='weights to load (timm checkpoint_path)')
    parser.add_argument('--model-kwargs', nargs='*', default=[], help='key=value arguments of timm.create_model')
    parser.add_argument('--trace-size', type=_size, default=(224, 224), help='HxW the graph is traced at')
    parser.add_argument('--sizes', nargs='*', type=_size, default=[], help='HxW sizes to check and time the file at')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='threads of torch and onnxruntime (default: all)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, checkpoint_path=args.checkpoint or '', **_kwargs(args.model_kwargs))
    path = args.output or f'output/{args.model}.onnx'
    start = time.perf_counter()
    export_onnx(model, path, img_size=args.trace_size)
    print(f'wrote {path} in {time.perf_counter() - start:.0f} s (dynamic batch, height and width)')
    if args.sizes:
        for row in onnx_latency(model, path, args.sizes, batch_size=args.batch_size, threads=args.threads):
            print(json.dumps(row))


if __name__ == '__main__':
    main()
