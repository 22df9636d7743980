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


def to_grey(rgb):
    """uint8 (1, H, W) luminance of a uint8 (3, H, W) image, as PIL's convert("L") computes it
    (ITU-R 601-2); a grey image stored as RGB comes back exactly."""
    r, g, b = rgb.int()
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, natural order), for evaluation, as RGB or
    (channels=1, for 1-channel models) grey."""

    def __init__(self, root, image_size, resize="crop", channels=3):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        self.image_size, self.resize, self.channels = image_size, resize, channels
        self.item_shape = (channels, image_size, image_size)
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
            image = load_frame(self.paths[i], self.image_size, self.resize)
            return (to_grey(image) if self.channels == 1 else image), []
        except DECODE_ERRORS as e:
            return None, [f"{self.paths[i]} ({type(e).__name__}: {e})"]


CELEBA_FILES = {"train": "train_data.npy", "val": "eval_data.npy"}


class CelebAArrays(Dataset):
    """uint8 N x C x H x W images (C = 3, or 1 for grey data) of prepare_celeba.py, read by
    memory map: each DataLoader worker maps the file on first use instead of holding a copy of
    the 12-17 GB array."""

    def __init__(self, path, image_size=None, channels=None):
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist: run prepare_celeba.py -o {os.path.dirname(path)}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:      # truncated, not .npy, pickled objects
            raise DataError(f"{path} is not a readable uint8 array ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'empty'}); re-run "
                            f"prepare_celeba.py -o {os.path.dirname(path)}") from None
        if array.ndim != 4 or array.shape[1] not in (1, 3) or array.dtype != np.uint8:
            raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 N x C x H x W "
                            f"with C = 3 (or 1)")
        if image_size and array.shape[2:] != (image_size, image_size):
            raise DataError(f"{path} holds {array.shape[2]}x{array.shape[3]} images, the model "
                            f"wants {image_size}x{image_size}: re-run prepare_celeba.py "
                            f"--image-size {image_size}")
        if channels and array.shape[1] != channels:
            raise DataError(f"{path} holds {array.shape[1]}-channel images and "
                            f"model_params.in_channels is {channels}")
        self.file, self.shape, self._array = path, array.shape, None
        self.item_shape = tuple(array.shape[1:])

    def __len__(self):
        return self.shape[0]

    def path(self, i):
        return f"{self.file}[{i}]"

    def __getitem__(self, i):
        if self._array is None:                 # opened lazily, once per process
            self._array = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])), []


class MNISTImages(Dataset):
    """MNIST's test split (or train) from torchvision's folder layout, read offline:
    ROOT/MNIST/raw/t10k-images-idx3-ubyte (and train-images-idx3-ubyte). uint8 1 x 28 x 28."""

    def __init__(self, root, split="val"):
        from torchvision.datasets.mnist import read_image_file
        root = os.path.dirname(os.path.normpath(root)) \
            if os.path.basename(os.path.normpath(root)) == "MNIST" else root
        train = split == "train"
        name = f"{'train' if train else 't10k'}-images-idx3-ubyte"
        self.file = os.path.join(root, "MNIST", "raw", name)
        if not os.path.isfile(self.file):
            raise DataError(f"no MNIST under {root}: expected {self.file} (torchvision's "
                            f"layout); fetch it where there is internet with python -c \"from "
                            f"torchvision.datasets import MNIST; MNIST('{root}', "
                            f"train={train}, download=True)\"")
        try:                                  # torchvision's own reader of the idx format
            self.images = read_image_file(self.file)
        except (AssertionError, ValueError, RuntimeError, OSError) as e:
            raise DataError(f"{self.file} is not an MNIST idx image file ({type(e).__name__}"
                            f"{': ' + str(e).splitlines()[0] if str(e) else ''})") from None
        self.item_shape = (1, *self.images.shape[1:])
        self.split = split
        self.source = "MNIST " + ("train" if train else "test (t10k)")

    def __len__(self):
        return len(self.images)

    def path(self, i):
        return f"{self.file}[{i}]"

    def __getitem__(self, i):
        return self.images[i][None].clone(), []


class DSpritesImages(Dataset):
    """dSprites (`dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`, its `imgs` of 0/1 values):
    uint8 1 x 64 x 64 images, 0 or 255. dSprites has no split: every image is scored."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise DataError(f"{path} is not a file: give the dSprites .npz "
                            f"(dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz)")
        try:
            with np.load(path, allow_pickle=False) as z:
                images = z["imgs"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise DataError(f"{path} is not dSprites' .npz with an `imgs` array "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        if images.ndim != 3 or images.max(initial=0) > 1:
            raise DataError(f"{path}: `imgs` holds {images.dtype} {images.shape}, not N x H x W "
                            f"of 0/1 values")
        self.images, self.file = images, path
        self.item_shape = (1, *images.shape[1:])
        self.split, self.source = "all", "dSprites (no split: every image)"

    def __len__(self):
        return len(self.images)

    def path(self, i):
        return f"{self.file}[{i}]"

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i].astype(np.uint8) * 255)[None], []
