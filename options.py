"""Command-line pieces the scripts share, light enough to answer --help and usage errors before
torch is imported: the training flags, the LPIPS / rFID flags and their labels in reports, and
the check that optional packages are installed before any work starts.
"""
import argparse
import importlib.util
import os

from errors import ConfigError


class Formatter(argparse.RawDescriptionHelpFormatter):
    """--help shows the description as written and each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def require(*packages, listed_in="requirements.txt"):
    """Refuse to start when an optional package a run will need is missing (rather than after
    an hour of work). `packages`: (import name, pip requirement, what needs it); `listed_in`:
    the requirements file that pins them."""
    missing = [(pip, why) for name, pip, why in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError("; ".join(f"{why} needs {pip.split('=')[0]}" for pip, why in missing)
                          + ": pip install " + " ".join(pip for pip, _ in missing)
                          + f" (or pip install -r {listed_in})")


def check_exist(args, *flags):
    """Refuse, in one line, the first path given to one of `flags` that does not exist: every
    input is looked at before any model or weight file is loaded."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        for path in value if isinstance(value, list) else [value]:
            if path and not str(path).startswith("hf:") and not os.path.exists(path):
                raise ConfigError(f"{flag} {path} does not exist")


MATPLOTLIB = ("matplotlib", "matplotlib==3.11.2", "the comparison's figures")
SKLEARN = ("sklearn", "scikit-learn==1.9.1", "--probe")


def parse_training_args(description, argv=None):
    """The command line of train_single_gpu.py and train_ddp.py."""
    parser = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set exp_params.LR=3e-4")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="checkpoint to continue from; 'auto' = newest valid one of the run")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume even though frames were added or removed since the "
                             "checkpoint (steps per epoch and the schedule follow the new data)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available and trainer_params.gpus != 0")
    return parser.parse_args(argv)


def add_lpips_arguments(parser):
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "none"], default="alex",
                        help="LPIPS backbone (weights: fetch_weights.py; none skips LPIPS)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="untrained LPIPS backbone: tests the pipeline offline; the LPIPS "
                             "numbers are then meaningless and metrics.json says so")


def add_fid_arguments(parser):
    parser.add_argument("--fid", choices=["inception", "none"], default="inception",
                        help="rFID with the FID Inception-v3 (weights: fetch_weights.py --fid)")
    parser.add_argument("--fid-random-backbone", action="store_true",
                        help="untrained Inception: tests the pipeline offline; rFID values are "
                             "then meaningless and metrics.json says so")


def fid_label(args):
    """How rFID was computed, for metrics.json."""
    if args.fid == "none":
        return "skipped with --fid none"
    return "inception" + (" (random backbone at 96 px: rFID values meaningless)"
                          if args.fid_random_backbone else "")


def lpips_label(args):
    """How LPIPS was computed, for metrics.json."""
    return args.lpips_net + (" (random backbone: LPIPS values meaningless)"
                             if args.lpips_random_backbone and args.lpips_net != "none" else "")


def about(doc):
    """A script's --help description: its docstring's first paragraph as one line (the first
    line alone can stop mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())
