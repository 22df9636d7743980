"""SthV2's label files: their names, the video ids of each split, and each video's action
template. Standard library only (the probe and the packers read them without torch).
"""
import json
import os

from errors import DataError

LABEL_FILES = {"train": "something-something-v2-train.json",
               "val": "something-something-v2-validation.json"}


def _entries(path, what):
    try:
        with open(path) as f:
            return [(str(entry["id"]), entry) for entry in json.load(f)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {what} from {path}: {e}") from None


def read_label_ids(folder):
    """{split: set of video ids} from the label files in `folder`."""
    return {split: {vid for vid, _ in _entries(os.path.join(folder, name), "video ids")}
            for split, name in LABEL_FILES.items()}


def read_templates(labels_dir):
    """{video id: action template} from the SthV2 label files in `labels_dir`."""
    templates = {}
    for name in LABEL_FILES.values():
        path = os.path.join(labels_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"the probe needs the SthV2 label files ({' and '.join(LABEL_FILES.values())}) "
                            f"with a 'template' per video; {path} is missing")
        try:
            templates.update({vid: str(entry["template"])
                              for vid, entry in _entries(path, "video templates")})
        except (KeyError, TypeError) as e:
            raise DataError(f"cannot read video templates from {path}: {e}") from None
    return templates


def read_instructions(labels_dir):
    """{video id: its instruction} from the SthV2 label files in `labels_dir`: each entry's
    `label` (the template with its objects named, as LAPA's instructions are), else its
    `template`. {} when the folder holds no label files."""
    paths = [os.path.join(labels_dir, name) for name in LABEL_FILES.values()]
    instructions = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        for vid, entry in _entries(path, "video labels"):
            text = entry.get("label", entry.get("template")) if isinstance(entry, dict) else None
            if not isinstance(text, str):
                raise DataError(f"cannot read the instruction of video {vid} from {path}: it "
                                f"has no 'label' or 'template' text")
            instructions[vid] = text
    return instructions
