"""Launched by tests/test_video_train.py under `accelerate launch` (two CPU processes): trains on HMDB-51 clips,
then writes what each rank holds, how many updates it ran and which videos it opened."""
import os
import sys

from pytorchvideo.data.video import VideoPathHandler
from safetensors.torch import save_file

from s4nd_vision.train import Trainer, load_config


def _save(model, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def main() -> None:
    opened = []
    open_video = VideoPathHandler.video_from_path

    def spy(self, filepath, **kwargs):  # every video this process decodes (data.workers=0: in this process)
        opened.append(os.path.basename(filepath))
        return open_video(self, filepath, **kwargs)

    VideoPathHandler.video_from_path = spy
    trainer = Trainer(load_config(None, sys.argv[1:]))
    acc, out = trainer.accelerator, trainer.cfg.train.output_dir
    rank = acc.process_index
    if rank == 0:
        _save(acc.unwrap_model(trainer.model), os.path.join(out, 'rank0_initial.safetensors'))
    trainer.fit()
    _save(acc.unwrap_model(trainer.model), os.path.join(out, f'rank{rank}.safetensors'))
    with open(os.path.join(out, f'rank{rank}_videos.txt'), 'w') as f:
        f.write(f'{trainer.state.update}\n' + ' '.join(opened))


if __name__ == '__main__':
    main()
