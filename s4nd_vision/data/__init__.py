"""Datasets: image folders with unreadable files skipped, built-in data that ships inside pip packages.

Video (HMDB-51 through pytorchvideo) lives in `s4nd_vision.data.video`, imported on demand: pytorchvideo is heavy.
"""
from .images import EpochSeeded, ImageFolderDataset, ResumableSampler
from .mnist import MNIST5k, SequentialMNIST5k, export_image_folder, flatten_image, load_mnist_5k
