"""What produced a result: the repository's commit, the packages, the command line, and hashes
of the files it read. Every checkpoint, config.yaml, metrics.json, probe.json and report
carries one, so a number can be traced to the code and data behind it.

Standard library only; packages that are not installed are left out, and a run outside a git
checkout says so instead of failing.
"""
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("torch", "torchvision", "numpy", "lpips", "piq", "scikit-learn", "scipy",
            "matplotlib", "pythae", "huggingface_hub")


def git_state(folder):
    """{"commit", "dirty"} of the git checkout holding `folder`, or {"note"} when it is none."""
    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "note": "not a git checkout"}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "note": "git is not available"}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def sha256_of(path, chunk=1 << 24):
    """Hex sha256 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def index_hash(index):
    """sha256 of a frame index's content: every video id and its frame numbers."""
    digest = hashlib.sha256()
    for v, video in enumerate(index.videos):
        digest.update(f"{video}\0".encode())
        digest.update(index.numbers[index.offsets[v]:index.offsets[v + 1]].tobytes())
    return digest.hexdigest()


def versions():
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def manifest(files=None, labels_dir=None, index=None, laq_repo=None):
    """The manifest of this process: git state of the repository, versions, command line, and
    `files` ({name: path}) with their sha256, the SthV2 label files in `labels_dir`, a frame
    index's content hash, and the git state of a LAQ checkout."""
    from labels import LABEL_FILES
    out = {"git": git_state(ROOT), "versions": versions(),
           "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv
           else ""}
    if files:
        out["files"] = {name: {"path": os.path.abspath(path), "sha256": sha256_of(path)}
                        for name, path in files.items() if path}
    if labels_dir:
        out["labels"] = {name: sha256_of(os.path.join(labels_dir, name))
                         for name in LABEL_FILES.values()}
    if index is not None:
        out["frame_index"] = {"root": index.root, "videos": len(index.videos),
                              "frames": len(index), "sha256": index_hash(index)}
    if laq_repo:
        out["laq_checkout"] = {"path": os.path.abspath(laq_repo), **git_state(laq_repo)}
    return out
