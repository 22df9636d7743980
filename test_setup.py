"""Check that this machine can train: Python, torch/CUDA, packages, config, data, model, logs.

    python test_setup.py [--config config_vae_sthv2.yaml] [--set SECTION.KEY=VALUE ...]
                         [--device cpu|cuda]

Prints a table of checks (✓ pass, ✗ fail, ! warning) and exits 1 if any check failed; each
failure says how to fix it.
"""
import argparse
import importlib
import os
import platform
import sys
import tempfile

from options import about

PACKAGES = [("torch", "torch"), ("torchvision", "torchvision"), ("yaml", "pyyaml"),
            ("tensorboard", "tensorboard"), ("PIL", "pillow"), ("numpy", "numpy"),
            ("tqdm", "tqdm"), ("lpips", "lpips"), ("piq", "piq")]
# needed by one script each: a warning when missing, not a failure of the training set-up
OPTIONAL = [("matplotlib", "matplotlib==3.11.2", "compare_with_laq.py's figures"),
            ("sklearn", "scikit-learn==1.9.1", "compare_with_laq.py --probe"),
            ("av", "av==18.1.0", "prepare_sthv2.py (.webm videos)"),
            ("einops", "einops", "LAQ's model (compare_with_laq.py --laq)"),
            ("beartype", "beartype", "LAQ's model (compare_with_laq.py --laq)")]


class Report:
    def __init__(self):
        self.rows, self.failed = [], False

    def add(self, mark, name, detail, fix=""):
        self.rows.append((mark, name, detail, fix))
        self.failed |= mark == "✗"

    def print(self):
        width = max(len(r[1]) for r in self.rows)
        for mark, name, detail, fix in self.rows:
            print(f" {mark}  {name:<{width}}  {detail}")
            if fix:
                print(f"    {'':<{width}}  fix: {fix}")


def check_packages(report):
    ok = True
    for module, package in PACKAGES:
        try:
            mod = importlib.import_module(module)
            report.add("✓", f"package {package}", getattr(mod, "__version__", "installed"))
        except ImportError as e:
            ok = False
            report.add("✗", f"package {package}", f"cannot import ({e})",
                       "pip install -r requirements.txt")
    for module, package, used_by in OPTIONAL:
        try:
            mod = importlib.import_module(module)
            report.add("✓", f"package {package.split('==')[0]}",
                       getattr(mod, "__version__", "installed"))
        except ImportError:
            report.add("!", f"package {package.split('==')[0]}", f"missing: needed by {used_by}",
                       f"pip install {package}")
    if ok:
        from frame_files import JPEG_DECODER, describe_jpeg_decoder
        report.add("!" if JPEG_DECODER == "pil" else "✓", "JPEG decoder", JPEG_DECODER,
                   describe_jpeg_decoder() if JPEG_DECODER == "pil" else "")
        check_video_decoders(report)
    return ok


def check_video_decoders(report):
    """Each video decoder of prepare_sthv2.py, usable only if it decoded a clip made here."""
    from video_decoding import CANDIDATES, INSTALL, decoder_status
    status = decoder_status()
    for name in CANDIDATES:
        why = status[name]
        report.add("✓" if why is None else "!", f"video decoder {name}",
                   "decodes a test clip" if why is None else f"not usable: {why}",
                   "" if why is None else INSTALL[name])
    if all(status.values()):
        report.add("!", "video decoding", "no decoder works: prepare_sthv2.py cannot run",
                   INSTALL["pyav"])


def main():
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--config", default="config_vae_sthv2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    args = parser.parse_args()
    report = Report()

    py_ok = sys.version_info >= (3, 9)
    report.add("✓" if py_ok else "✗", "python", platform.python_version(),
               "" if py_ok else "use Python 3.9 or newer")
    if not check_packages(report):
        report.print()
        sys.exit(1)

    import torch
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    report.add("✓" if (major, minor) >= (2, 4) else "✗", "torch version", torch.__version__,
               "" if (major, minor) >= (2, 4) else "install torch >= 2.4")
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        report.add("✓", "CUDA", f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}; "
                   f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        report.add("!", "CUDA", f"no GPU visible (torch CUDA build: {torch.version.cuda}); "
                   "training runs on the CPU",
                   "on a GPU node, install a torch build matching the driver (README)")

    from config import load_config
    from errors import ConfigError
    try:
        cfg = load_config(args.config, args.set)
        report.add("✓", "config", f"{args.config}: {cfg.model_params['name']}, "
                   f"{cfg.model_params['image_size']} px")
    except ConfigError as e:
        report.add("✗", "config", str(e), "fix the file or key it names (docs/configuration.md lists every key)")
        report.print()
        sys.exit(2)                           # bad input, as in every script

    from runtime import pick_device
    try:
        device = pick_device(args.device, cfg.trainer_params.gpus)
    except ConfigError as e:
        report.add("✗", "device", str(e), "drop --device cuda or run on a GPU node")
        report.print()
        sys.exit(2)

    check_data(report, cfg)
    check_model(report, cfg, device)
    check_logdir(report, cfg)
    report.print()
    sys.exit(1 if report.failed else 0)


def check_data(report, cfg):
    from torch.utils.data import DataLoader

    from dataset_sthv2 import build_split
    from errors import DataError
    from frame_index import load_index
    from loaders import collate_frames
    from models import image_channels
    d, size = cfg.data_params, cfg.model_params["image_size"]
    try:
        index = load_index(d.data_path, d.index_cache_dir) if d.dataset == "sthv2" else None
        train_set, val_set = (build_split(d, split, size, index, pair_offset=d.frame_offset,
                                          clamp_pairs=True,
                                          channels=image_channels(cfg.model_params))
                              for split in ("train", "val"))
    except DataError as e:
        report.add("✗", "data layout", str(e),
                   "point data_params.data_path at <video_id>/img_00001.jpg folders")
        return
    where = (f"{len(index.videos)} videos, {len(index)} frames; " if index else "")
    report.add("✓", "data layout", f"{where}train {len(train_set)} / val {len(val_set)} "
               f"{'frames' if index else 'images'} used")
    loader = DataLoader(train_set, min(d.train_batch_size, len(train_set)), shuffle=True,
                        collate_fn=collate_frames)
    images, bad = next(iter(loader))
    detail = f"batch {tuple(images.shape)} {images.dtype}"
    if bad:
        report.add("!", "sample batch", f"{detail}; {len(bad)} unreadable: {bad[0]}",
                   "re-extract the frames named")
    else:
        report.add("✓", "sample batch", detail)


def check_model(report, cfg, device):
    """One training step through the step engine, as the run takes it: on a GPU at the
    per-GPU batch the config gives and compiled when trainer_params.compile says so (a batch
    too large for the GPU fails here, not an hour into the job); on the CPU with 2 items."""
    import torch

    from models import count_parameters, item_shape
    from runtime import Runtime
    from trainer import Trainer
    t = cfg.trainer_params
    if device.type == "cuda":
        gpus = torch.cuda.device_count() if t.gpus < 0 else min(t.gpus, torch.cuda.device_count())
        batch = cfg.data_params.train_batch_size // max(1, gpus)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        batch = 2
    try:
        trainer = Trainer(cfg, Runtime(device=device), steps_per_epoch=1)
        images = torch.randint(0, 256, (batch, *item_shape(cfg.model_params)), dtype=torch.uint8)
        finite = trainer.step(images)[2]
        detail = (f"{cfg.model_params['name']} {count_parameters(trainer.bare):,} parameters, "
                  f"one step of {batch} on {device}" + (", compiled" if trainer.compiled else ""))
        if device.type == "cuda":
            detail += f", peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
        report.add("✓" if bool(finite) else "!", "model training step", detail,
                   "" if bool(finite) else "the step's loss was not finite")
    except torch.cuda.OutOfMemoryError:
        report.add("✗", "model training step", f"out of GPU memory at {batch} per GPU",
                   "lower data_params.train_batch_size, or train on more GPUs")
    except RuntimeError as e:
        report.add("✗", "model training step", str(e).strip().splitlines()[0],
                   "set trainer_params.compile: false if compiling failed; else lower "
                   "image_size / hidden_dims")


def check_logdir(report, cfg):
    save_dir = cfg.logging_params.save_dir
    try:
        os.makedirs(save_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save_dir):
            pass
        report.add("✓", "log directory", f"{os.path.abspath(save_dir)} is writable")
    except OSError as e:
        report.add("✗", "log directory", f"{save_dir}: {e.strerror}",
                   "set logging_params.save_dir to a writable folder")


if __name__ == "__main__":
    main()
