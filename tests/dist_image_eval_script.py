"""Launched by tests/test_train.py under torchrun (two CPU processes, gloo): evaluates a model sharded by FSDP2
(every forward a collective) on validation sets whose size is not a multiple of processes x batch (down to one image:
a process with no image of its own), with and without an unreadable image, and writes (rank 0), per case, the
forwards of each rank, the metrics and the top-1 expected from the images themselves."""
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.fsdp import fully_shard

from s4nd_vision.train import load_config
from s4nd_vision.train.data import ImageFolderData


class _Images(torch.utils.data.Dataset):
    """`(image, target, skipped)`: image i is a one-hot of class i % 3, every target is class 0 (so image i is right
    when i % 3 == 0); `unreadable`: the indices read as an unreadable image's stand-in."""

    def __init__(self, n, unreadable=()):
        self.n, self.unreadable = n, set(unreadable)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.eye(3)[i % 3], 0, int(i in self.unreadable)


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.forwards = torch.nn.Linear(3, 6), 0
        with torch.no_grad():  # logits: the image itself (then zeros)
            self.linear.weight.zero_()
            self.linear.weight[:3].copy_(torch.eye(3))
            self.linear.bias.zero_()

    def forward(self, x):
        self.forwards += 1
        return self.linear(x)


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    cases = []
    for batch_size in (1, 2):
        for n, unreadable in ((1, ()), (3, ()), (3, (2,)), (5, (4,))):
            data = ImageFolderData.__new__(ImageFolderData)  # (the evaluation's parts only)
            data.cfg = load_config(None, [*overrides, f'data.batch_size={batch_size}', 'data.workers=0'])
            data.accelerator, data.memory_format = acc, torch.contiguous_format
            data.val_loader = acc.prepare(data._loader(_Images(n, unreadable), shuffle=False))
            model = _Counting()
            fully_shard(model)
            metrics = data.evaluate(model)
            read = [i for i in range(n) if i not in unreadable]
            cases.append(dict(batch_size=batch_size, n=n, unreadable=len(unreadable), metrics=metrics,
                              forwards=gather_object([model.forwards]),
                              expected_top1=100 * sum(i % 3 == 0 for i in read) / len(read)))
    if acc.is_main_process:
        with open(out, 'w') as f:
            json.dump(cases, f)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
