"""The benchmarks behind bench.py: training-step throughput and MFU, frame loading against
LAQ's loader, the frame index at SthV2 scale, and LAQ's part of the comparison (bench.py's
docstring says what each measures). bench.py parses the command line before importing this.
"""
import functools
import math
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import decode_jpeg

from config import load_config
from dataset_sthv2 import SthV2Frames
from errors import DataError
from frame_files import JPEG_DECODER
from frame_index import PackedFrameIndex, load_index, tree_signature
from loaders import PooledCollate, device_batches
from models import build_model, item_shape
from packing import pack
from runtime import Runtime, pick_device
from trainer import Trainer

# Dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, tf32 tensor cores). First match wins.
PEAK_TFLOPS = [("H200", 989.4, 494.7), ("GH200", 989.4, 494.7), ("H100 PCIe", 756.5, 378.0),
               ("H100 NVL", 835.5, 417.6), ("H100", 989.4, 494.7), ("A100", 312.0, 156.0),
               ("L40S", 362.1, 183.0), ("A40", 149.7, 74.8), ("A10", 125.0, 62.5),
               ("V100", 125.0, 15.7), ("RTX 4090", 165.2, 82.6), ("A6000", 154.8, 77.4)]


def peak_flops(device, precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, low, tf32 in PEAK_TFLOPS:
        if key in name:
            return (low if precision in ("bf16", "fp16") else tf32) * 1e12
    return None


def flops_per_image(cfg, batch, device):
    """Forward + backward FLOPs of one training step per item (image or frame pair), by
    torch's flop counter."""
    model = build_model(cfg.model_params).to(device)
    x = torch.rand(batch, *item_shape(cfg.model_params), device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        model.loss_function(x, model(x), 1e-4)["loss"].backward()
    return counter.get_total_flops() / batch


def time_steps(step, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(timers, rounds):
    """Call each timer once per round, in alternating order, since a shared machine's speed
    drifts; returns (the median per name, every round)."""
    names = list(timers)
    results = [{name: timers[name]() for name in (names if r % 2 == 0 else names[::-1])}
               for r in range(rounds)]
    return {name: statistics.median(r[name] for r in results) for name in names}, results


def bench_train(args):
    overrides = list(args.set)
    if args.batch_size:
        overrides.append(f"data_params.train_batch_size={args.batch_size}")
    cfg = load_config(args.config, overrides, check_paths=False)
    device = pick_device(args.device, cfg.trainer_params.gpus)
    batch = cfg.data_params.train_batch_size
    trainer = Trainer(cfg, Runtime(device=device), steps_per_epoch=10 ** 9)
    images = torch.randint(0, 256, (batch, *item_shape(cfg.model_params)), dtype=torch.uint8,
                           device=device)

    def step():
        trainer.step(images)

    for _ in range(args.warmup):                        # includes torch.compile's first call
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_steps(step, 1, device)                         # peak memory before the reference exists
    peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20

    # the reference: a plain fp32 eager loop of the same model, no clipping, no extras
    torch.manual_seed(0)
    plain = build_model(cfg.model_params).to(device)
    adam = torch.optim.Adam(plain.parameters(), lr=cfg.exp_params.LR)

    def plain_step():
        x = images.float() / 127.5 - 1
        loss = plain.loss_function(x, plain(x), cfg.exp_params.kld_weight)["loss"]
        adam.zero_grad()
        loss.backward()
        adam.step()

    for _ in range(args.warmup):
        plain_step()
    medians, _ = alternate({"ours": lambda: time_steps(step, args.steps, device),
                            "plain": lambda: time_steps(plain_step, args.steps, device)},
                           args.rounds)
    seconds, plain_seconds = medians["ours"], medians["plain"]

    flops = flops_per_image(cfg, min(batch, 8), device)
    images_per_sec = batch * args.steps / seconds
    peak = peak_flops(device, cfg.trainer_params.precision)
    return {"images_per_sec": round(images_per_sec, 2),
            "step_ms": round(1000 * seconds / args.steps, 3),
            "gflop_per_image": round(flops / 1e9, 3),
            "mfu": round(images_per_sec * flops / peak, 4) if peak else None,
            "peak_mem_mb": round(peak_mb, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "item": "frame pair" if len(item_shape(cfg.model_params)) == 4 else "image",
            "batch_size": batch, "steps": args.steps,
            "precision": cfg.trainer_params.precision if device.type == "cuda" else "fp32",
            "compile": trainer.compiled,
            "channels_last": trainer.channels_last,
            "plain_eager_images_per_sec": round(batch * args.steps / plain_seconds, 2),
            "speedup_vs_plain_eager": round(plain_seconds / seconds, 3), "rounds": args.rounds,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


class LaqStyleFrames(Dataset):
    """What LAQ's published loader does per frame: list and sort the video folder, open the
    file with PIL, torchvision Resize((S, S)) and ToTensor (float32 on the CPU)."""

    def __init__(self, frames, image_size):
        from torchvision import transforms
        # the original frames tree, also when `frames` reads packed shards
        self.items = [(os.path.dirname(frames.path(i)), int(frames.pos[i]))
                      for i in range(len(frames))]
        self.transform = transforms.Compose([transforms.Resize((image_size, image_size)),
                                             transforms.ToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        folder, pos = self.items[i]
        names = sorted(os.listdir(folder))
        return self.transform(Image.open(os.path.join(folder, names[pos])).convert("RGB"))


PREFETCH = 4


def time_loader(dataset, args, collate_fn=None):
    """Frames/s of a DataLoader, its batches taken the way the training loop takes them."""
    loader = DataLoader(dataset, args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=collate_fn, drop_last=True,
                        generator=torch.Generator().manual_seed(0),
                        persistent_workers=args.workers > 0,
                        **({"prefetch_factor": PREFETCH} if args.workers else {}))
    batches = device_batches(loader, torch.device("cpu")) if collate_fn else iter(loader)
    for _ in range(max(2, 2 * args.workers)):          # start the workers, fill the queue
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    return args.batch_size * args.batches / (time.perf_counter() - start)


def time_decode(encoded, args, device):
    """Frames/s of decoding the training-ready JPEGs batch by batch in the main process, on
    `device`: libjpeg-turbo on a CPU, nvJPEG on a GPU (what decoding on the device costs)."""
    start = time.perf_counter()
    for b in range(args.batches):
        batch = encoded[b * args.batch_size:(b + 1) * args.batch_size]
        images = torch.stack(decode_jpeg(batch, device=device.type))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    assert images.shape[-1] == args.image_size
    return args.batch_size * args.batches / (time.perf_counter() - start)


def bench_data(args):
    """Frames/s of the ways to feed training from one frames tree, in one run: LAQ's loader,
    the tree, byte-for-byte shards, training-ready shards (all with the same DataLoader
    workers), and decoding the training-ready JPEGs on --device in the main process; and how
    many workers each needs for --target-images-per-sec."""
    index = load_index(args.data_path, args.index_cache_dir)
    if isinstance(index, PackedFrameIndex):
        raise DataError(f"{args.data_path} is packed; give the frames tree (the benchmark "
                        f"packs it itself)")
    frames = SthV2Frames(index, range(len(index.videos)), args.image_size, resize=args.resize)
    needed = (args.batches + max(2, 2 * args.workers) + 4 * max(args.workers, 1)) * args.batch_size
    if len(frames) < needed:
        raise DataError(f"{args.data_path} has {len(frames)} frames; this run needs {needed} "
                        f"(lower --batches or --batch-size)")
    for i in range(len(frames)):
        if not os.path.isfile(frames.path(i)):
            raise DataError(f"the baseline reads the frames tree, and {frames.path(i)} is missing")
    device = pick_device(args.device, gpus=-1)
    work = tempfile.mkdtemp(prefix="bench_data_", dir=args.pack_dir or None)
    try:
        pack(args.data_path, os.path.join(work, "shards"), 2 ** 31, args.index_cache_dir)
        pack(args.data_path, os.path.join(work, "ready"), 2 ** 31, args.index_cache_dir,
             args.image_size, args.resize, args.quality, workers=os.cpu_count())
        sets = {"tree": frames}
        for name in ("shards", "ready"):
            packed = load_index(os.path.join(work, name))
            sets[name] = SthV2Frames(packed, range(len(packed.videos)), args.image_size,
                                     resize=args.resize)
        for dataset in sets.values():                  # every loader reads from the page cache
            for i in range(len(dataset)):
                dataset.index.read_bytes(int(dataset.video[i]), int(dataset.pos[i]))
        ready = sets["ready"].index
        encoded = [torch.frombuffer(bytearray(ready.read_bytes(int(v), int(p))), dtype=torch.uint8)
                   for v, p in zip(sets["ready"].video, sets["ready"].pos)]
        timers = {"laq": functools.partial(time_loader, LaqStyleFrames(frames, args.image_size),
                                           args)}
        timers.update({name: functools.partial(time_loader, dataset, args,
                                               PooledCollate(PREFETCH + 2))
                       for name, dataset in sets.items()})
        timers["device_decode"] = functools.partial(time_decode, encoded, args, device)
        medians, rounds = alternate(timers, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    workers = max(args.workers, 1)
    paths = {}
    for name, fps in medians.items():
        per_worker = fps if name == "device_decode" else fps / workers
        paths[name] = {"frames_per_sec": round(fps, 1),
                       "frames_per_sec_per_worker": round(per_worker, 1),
                       "workers_for_target": math.ceil(args.target_images_per_sec / per_worker)}
    paths["device_decode"]["ms_per_frame"] = round(1000 / medians["device_decode"], 3)
    paths["device_decode"]["device"] = str(device)
    return {"paths": paths, "target_images_per_sec": args.target_images_per_sec,
            "ready_vs_tree": round(medians["ready"] / medians["tree"], 2),
            "ready_vs_laq": round(medians["ready"] / medians["laq"], 2),
            "workers": args.workers, "batch_size": args.batch_size, "batches": args.batches,
            "jpeg_decoder": JPEG_DECODER,
            "image_size": args.image_size, "resize": args.resize, "quality": args.quality,
            "rounds": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
            "cpus": os.cpu_count()}


def bench_index(args):
    """The frame index at scale: a synthetic tree of empty frame files, the time to build the
    index, to load its cache (an unchanged tree), and the memory a DataLoader worker adds."""
    root = os.path.join(tempfile.mkdtemp(prefix="bench_index_", dir=args.root or None), "frames")
    cache = os.path.join(os.path.dirname(root), "cache")
    try:
        start = time.perf_counter()
        for v in range(args.videos):
            folder = os.path.join(root, str(100000 + v))
            os.makedirs(folder)
            for f in range(1, args.frames + 1):
                os.close(os.open(os.path.join(folder, f"img_{f:05d}.jpg"), os.O_CREAT | os.O_WRONLY))
        made = time.perf_counter() - start
        start = time.perf_counter()
        index = load_index(root, cache)                 # no cache yet: scans and writes it
        build = time.perf_counter() - start
        loads, scans = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            tree_signature(root)
            scans.append(time.perf_counter() - start)
            start = time.perf_counter()
            index = load_index(root, cache)
            loads.append(time.perf_counter() - start)
        cache_mb = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 2 ** 20
        dataset = SthV2Frames(index, range(len(index.videos)), 8)
        private_kb = {touch: next(iter(DataLoader(WorkerMemory(dataset, touch), batch_size=None,
                                                  num_workers=1)))
                      for touch in (False, True)}
    finally:
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
    return {"videos": args.videos, "frames_per_video": args.frames, "frames": len(index),
            "make_tree_s": round(made, 1), "build_index_s": round(build, 2),
            "load_cache_s": round(statistics.median(loads), 3),
            "of_which_tree_scan_s": round(statistics.median(scans), 3),
            "cache_mb": round(cache_mb, 1),
            "worker_private_mb_idle": round(private_kb[False] / 1024, 1),
            "worker_private_mb_after_every_frame": round(private_kb[True] / 1024, 1),
            "index_copied_per_worker_mb": round((private_kb[True] - private_kb[False]) / 1024, 1),
            "rounds": args.rounds}


class WorkerMemory(torch.utils.data.IterableDataset):
    """In a DataLoader worker: with `touch`, look up every frame through the index (as items
    do over an epoch); then report the worker's private memory (kB), what it copied from the
    parent or allocated rather than shares. Touched minus untouched: the index's share."""

    def __init__(self, frames, touch):
        self.frames, self.touch = frames, touch

    def __iter__(self):
        for i in range(len(self.frames) if self.touch else 0):
            self.frames.path(i)
        with open("/proc/self/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        yield sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def bench_laq(args):
    """Seconds per pair for LAQ's reconstruction + codes: one pass vs two, alternating."""
    from laq_loader import LaqRunner, RedirectCuda, find_laq_package, import_laq_class, laq_config
    device = pick_device(args.device, gpus=-1)
    laq_class = import_laq_class(find_laq_package(args.laq_repo))
    config = laq_config(args.laq_config, laq_class)
    torch.manual_seed(0)
    with RedirectCuda(device):
        model = laq_class(**config).to(device).eval()
    size = config["image_size"]
    clip = torch.rand(args.batch_size, 3, 2, size, size, device=device)
    runner = LaqRunner(model)

    def two_passes():
        model.inference(clip)
        model.inference(clip, return_only_codebook_ids=True)

    def timed(fn):
        with torch.no_grad():
            return time_steps(fn, args.batches, device) / (args.batches * args.batch_size)

    with torch.no_grad():
        two_passes(), runner(clip)                      # warm-up
    medians, rounds = alternate({"two_passes": lambda: timed(two_passes),
                                 "one_pass": lambda: timed(lambda: runner(clip))}, args.rounds)
    sig = lambda v: float(f"{v:.4g}")  # noqa: E731
    return {"seconds_per_pair_one_pass": sig(medians["one_pass"]),
            "seconds_per_pair_two_passes": sig(medians["two_passes"]),
            "speedup": round(medians["two_passes"] / medians["one_pass"], 2),
            "passes": runner.passes, "batch_size": args.batch_size, "laq_config": config,
            "device": str(device), "threads": torch.get_num_threads(),
            "rounds": [{k: sig(v) for k, v in r.items()} for r in rounds]}
