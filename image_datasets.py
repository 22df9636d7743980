"""Datasets of single images that are not SthV2 videos: an image folder (evaluate.py --dataset
images) and prepare_celeba.py's uint8 arrays. Items are (uint8 CHW image or None, unreadable
paths), as the SthV2 datasets give.
"""
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from errors import DataError
from frame_files import DECODE_ERRORS, load_frame
from frame_index import natural_key


IMAGE_FILE = re.compile(r"\.(?:jpe?g|png|bmp|webp)$", re.I)


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, natural order), for evaluation."""

    def __init__(self, root, image_size, resize="crop"):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        self.image_size, self.resize = image_size, resize
        self.paths = sorted((os.path.join(d, f) for d, _, files in os.walk(root)
                             for f in files if IMAGE_FILE.search(f)), key=natural_key)
        if not self.paths:
            raise DataError(f"no .jpg/.png/.bmp/.webp images under {root}")

    def __len__(self):
        return len(self.paths)

    def path(self, i):
        return self.paths[i]

    def __getitem__(self, i):
        try:
            return load_frame(self.paths[i], self.image_size, self.resize), []
        except DECODE_ERRORS as e:
            return None, [f"{self.paths[i]} ({type(e).__name__}: {e})"]


CELEBA_FILES = {"train": "train_data.npy", "val": "eval_data.npy"}


class CelebAArrays(Dataset):
    """uint8 N x 3 x H x W images of prepare_celeba.py, read by memory map: each DataLoader
    worker maps the file on first use instead of holding a copy of the 12-17 GB array."""

    def __init__(self, path, image_size=None):
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist: run prepare_celeba.py -o {os.path.dirname(path)}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:      # truncated, not .npy, pickled objects
            raise DataError(f"{path} is not a readable uint8 array ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'empty'}); re-run "
                            f"prepare_celeba.py -o {os.path.dirname(path)}") from None
        if array.ndim != 4 or array.shape[1] != 3 or array.dtype != np.uint8:
            raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 N x 3 x H x W")
        if image_size and array.shape[2:] != (image_size, image_size):
            raise DataError(f"{path} holds {array.shape[2]}x{array.shape[3]} images, the model "
                            f"wants {image_size}x{image_size}: re-run prepare_celeba.py "
                            f"--image-size {image_size}")
        self.file, self.shape, self._array = path, array.shape, None

    def __len__(self):
        return self.shape[0]

    def path(self, i):
        return f"{self.file}[{i}]"

    def __getitem__(self, i):
        if self._array is None:                 # opened lazily, once per process
            self._array = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])), []
