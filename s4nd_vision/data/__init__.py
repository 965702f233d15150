"""Datasets: image folders with unreadable files skipped, built-in data that ships inside pip packages, video."""
from .images import EpochSeeded, ImageFolderDataset, ResumableSampler
