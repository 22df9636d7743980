"""Prepare CelebA as uint8 arrays: centre crop, resize, split by the official partition.

    python prepare_celeba.py --src DIR_OR_ZIP -o OUT [--partition FILE] [--image-size 64]
                             [--crop 148] [-j WORKERS] [--checkpoint-dir DIR] [--skip-download]
                             [--gdrive-url URL] [--eval-split valid|test|valid+test]
                             [--chunk-size 2000]

--src is the `img_align_celeba` folder (or a folder holding it), or the official
`img_align_celeba.zip`. list_eval_partition.txt (0 train, 1 valid, 2 test) is looked for next to
the source unless --partition names it. Each image is centre-cropped to --crop x --crop (148
of 178 x 218) and resized to --image-size (bilinear, antialiased). Writes

    OUT/train_data.npz, OUT/eval_data.npz    uint8 N x 3 x H x W under "images", file names
                                             under "filenames"
    OUT/train_data.npy, OUT/eval_data.npy    the same images, memory-mappable (training reads these)
    OUT/report.json                          counts, missing and unreadable files

Work is done in chunks saved under --checkpoint-dir (default OUT/.chunks): an interrupted run
started again skips the finished chunks. With --gdrive-url and a missing --src, the zip is
downloaded with the gdown package first (needs the network; --skip-download forbids it).
"""
import argparse
import io
import hashlib
import json
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import ReportedError, run_main
from files import atomic_write, remove_orphaned_temps
from options import about
from parallel import progress

SPLITS = {"train": {0}, "valid": {1}, "test": {2}, "valid+test": {1, 2}}
EXPECTED = {0: 162770, 1: 19867, 2: 19962}


class PrepareError(ReportedError):
    """The inputs cannot be prepared (one line that says why)."""


class Source:
    """Image bytes by file name, from a folder or from the official zip."""

    def __init__(self, src):
        self.src, self.zip = src, None
        if os.path.isfile(src) and zipfile.is_zipfile(src):
            self.zip = src
            with zipfile.ZipFile(src) as z:
                self.members = {os.path.basename(n): n for n in z.namelist()
                                if n.lower().endswith(".jpg")}
        elif os.path.isdir(src):
            inner = os.path.join(src, "img_align_celeba")
            self.folder = inner if os.path.isdir(inner) else src
            self.members = {n: n for n in os.listdir(self.folder) if n.lower().endswith(".jpg")}
        else:
            raise PrepareError(f"--src {src} is neither a folder nor a zip file")
        self._handle = None

    def read(self, name):
        if self.zip:
            if self._handle is None:            # one handle per worker process
                self._handle = zipfile.ZipFile(self.zip)
            return self._handle.read(self.members[name])
        with open(os.path.join(self.folder, self.members[name]), "rb") as f:
            return f.read()


def read_partition(path):
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise PrepareError(f"{path}:{number}: expected '<file>.jpg 0|1|2', got {line.strip()!r}")
            entries.append((parts[0], int(parts[1])))
    return entries


def find_partition(args):
    if args.partition:
        return args.partition
    base = args.src if os.path.isdir(args.src) else os.path.dirname(os.path.abspath(args.src))
    for candidate in (os.path.join(base, "list_eval_partition.txt"),
                      os.path.join(os.path.dirname(base), "list_eval_partition.txt")):
        if os.path.isfile(candidate):
            return candidate
    raise PrepareError(f"list_eval_partition.txt not found next to {args.src}: pass --partition")


def process(image_bytes, crop, size):
    """uint8 (3, size, size): centre crop of crop x crop, then antialiased bilinear resize."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        im = im.convert("RGB")
        w, h = im.size
        c = min(crop, w, h)
        left, top = (w - c) // 2, (h - c) // 2
        im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BILINEAR,
                                                             reducing_gap=None)
        return np.asarray(im).transpose(2, 0, 1).copy()


_SOURCE = None


def _init_worker(src):
    global _SOURCE
    _SOURCE = Source(src)


def _work(job):
    """Process one chunk of names; returns (images, kept names, problems)."""
    names, crop, size = job
    images, kept, problems = [], [], []
    for name in names:
        if name not in _SOURCE.members:
            problems.append({"file": name, "problem": "missing"})
            continue
        try:
            images.append(process(_SOURCE.read(name), crop, size))
            kept.append(name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            problems.append({"file": name, "problem": f"unreadable: {type(e).__name__}: {e}"})
    array = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return array, kept, problems


def prepare(args):
    if not os.path.exists(args.src):
        if args.gdrive_url and not args.skip_download:
            download(args.gdrive_url, args.src)
        else:
            raise PrepareError(f"--src {args.src} does not exist" + (
                "" if args.skip_download else " (pass --gdrive-url to download it)"))
    Source(args.src)                                     # fails early on a bad --src
    entries = read_partition(find_partition(args))
    os.makedirs(args.out, exist_ok=True)
    chunk_dir = args.checkpoint_dir or os.path.join(args.out, ".chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    for folder in (args.out, chunk_dir):  # arrays and chunks a killed run left half-written
        remove_orphaned_temps(folder)
    report = {"source": os.path.abspath(args.src), "image_size": args.image_size,
              "crop": args.crop, "eval_split": args.eval_split, "splits": {}}
    splits = {"train": SPLITS["train"], "eval": SPLITS[args.eval_split]}
    for split, partitions in splits.items():
        names = [n for n, p in entries if p in partitions]
        chunks = [names[i:i + args.chunk_size] for i in range(0, len(names), args.chunk_size)]
        chunk_path = lambda k: _chunk_path(chunk_dir, split, k, args.image_size, args.crop,  # noqa: E731
                                           args.src, chunks[k])
        todo = [k for k in range(len(chunks)) if not os.path.exists(chunk_path(k))]
        with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                                 initargs=(args.src,)) as pool, \
                progress(total=len(names), desc=split, unit="image") as bar:
            bar.update(len(names) - sum(len(chunks[k]) for k in todo))
            jobs = pool.map(_work, [(chunks[k], args.crop, args.image_size) for k in todo])
            for k, (array, kept, problems) in zip(todo, jobs):
                path = chunk_path(k)
                with atomic_write(path) as f:
                    np.savez(f, images=array, filenames=np.array(kept),
                             problems=np.array(json.dumps(problems)))
                bar.update(len(chunks[k]))
        report["splits"][split] = write_split([chunk_path(k) for k in range(len(chunks))],
                                              args.out, split, args.image_size, partitions)
    with atomic_write(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _chunk_path(chunk_dir, split, k, size, crop, src, names):
    """Finished chunk k, named by everything that decides its content (the settings, the
    source, and the image names it holds, which the partition, the eval split and the chunk
    size decide): a run with anything else never reuses it."""
    digest = hashlib.sha1(json.dumps([os.path.abspath(src), names]).encode()).hexdigest()[:12]
    return os.path.join(chunk_dir, f"{split}_{size}px_crop{crop}_{k:05d}_{digest}.npz")


def write_split(chunk_paths, out, split, size, partitions):
    """Join the chunks into OUT/{split}_data.npy (by memory map) and .npz."""
    total, problems, names = 0, [], []
    for path in chunk_paths:
        with np.load(path) as z:
            total += len(z["filenames"])
            names += z["filenames"].tolist()
            problems += json.loads(str(z["problems"]))
    shape = (total, 3, size, size)
    npy = os.path.join(out, f"{split}_data.npy")
    with atomic_write(npy) as f, \
            progress(total=total, desc=f"{split}_data.npy", unit="image") as bar:
        array = np.lib.format.open_memmap(f.name, mode="w+", dtype=np.uint8, shape=shape)
        at = 0                                # the memory map writes into the temp file
        for path in chunk_paths:
            images = np.load(path)["images"]
            array[at:at + len(images)] = images
            at += len(images)
            bar.update(len(images))
        array.flush()
        del array
    images = np.load(npy, mmap_mode="r")
    with atomic_write(os.path.join(out, f"{split}_data.npz")) as f, \
            tqdm.wrapattr(f, "write", total=images.nbytes, desc=f"{split}_data.npz",
                          disable=None) as counted:
        np.savez(counted, images=images, filenames=np.array(names))
    expected = sum(EXPECTED[p] for p in partitions)
    return {"images": total, "shape": list(shape), "skipped": problems,
            "official_count": expected}


def download(url, dest):
    try:
        import gdown
    except ImportError:
        raise PrepareError("--gdrive-url needs the gdown package: pip install gdown "
                           "(or download the zip yourself and pass it as --src)") from None
    if gdown.download(url, dest, quiet=False) is None:
        raise PrepareError(f"download from {url} failed")


def main():
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--src", required=True, help="img_align_celeba folder or zip")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--partition", help="list_eval_partition.txt (default: next to --src)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop", type=int, default=148)
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count())
    parser.add_argument("--checkpoint-dir", help="finished chunks (default OUT/.chunks)")
    parser.add_argument("--skip-download", action="store_true", help="never use the network")
    parser.add_argument("--gdrive-url", help="download the zip to --src with gdown if missing")
    parser.add_argument("--eval-split", choices=["valid", "test", "valid+test"], default="valid")
    parser.add_argument("--chunk-size", type=int, default=2000, help="images per saved chunk")
    args = parser.parse_args()
    if min(args.image_size, args.crop, args.workers, args.chunk_size) < 1:
        parser.error("--image-size, --crop, -j and --chunk-size must be positive")
    report = prepare(args)
    for split, info in report["splits"].items():
        print(f"{split}: {info['images']} images {info['shape']}, {len(info['skipped'])} skipped "
              f"(official split size {info['official_count']})")
    print(f"wrote {args.out}/train_data.npz, eval_data.npz, train_data.npy, eval_data.npy, "
          f"report.json")


if __name__ == "__main__":
    run_main(main)
