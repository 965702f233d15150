"""Launched by tests/test_video_train.py under torchrun (two CPU processes, gloo): evaluates a tiny video model
on HMDB-51 test clips whose shards hold different numbers of clips (an unreadable video on one rank), first as a
plain module, then sharded by FSDP2 (`fully_shard`: every forward all-gathers the parameters), then both again with
rank 1 given no clip at all, and writes the metrics (rank 0)."""
import copy
import json
import sys
from datetime import timedelta

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.distributed.fsdp import fully_shard

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.train import load_config
from s4nd_vision.train.data import Hmdb51Data


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    # (a mismatch of collectives fails in seconds, not at the default 30 minutes)
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    cfg = load_config(None, overrides)
    data = Hmdb51Data(cfg, acc)
    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, num_classes=data.num_classes, **cfg.model.kwargs,
                              **data.input_size_kwargs(cfg.model.name))
    data.bind(model)
    data.prepare_evaluation()
    plain_model = copy.deepcopy(model)
    plain = data.evaluate(model)
    for block in [m for m in model.modules() if type(m).__name__ == 'ConvNeXtS4NDBlock']:
        fully_shard(block)
    fully_shard(model)
    sharded = data.evaluate(model)
    if acc.process_index == 1:  # (a shard of unreadable videos)
        data.val_loader = []
    rank1_empty = dict(plain=data.evaluate(plain_model), sharded=data.evaluate(model))
    if acc.is_main_process:
        with open(out, 'w') as f:
            json.dump(dict(plain=plain, sharded=sharded, rank1_empty=rank1_empty), f)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
