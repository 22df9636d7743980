"""Latent action labels for every frame of SthV2, as LAPA writes them for latent-action
pretraining of a vision-language-action model (its laq/inference_sthv2.py).

    python label_actions.py --model CKPT --data-path DIR --out FILE.jsonl [--offset K]
        [--split train|val|all] [--batch-size B] [--workers W] [--device cpu|cuda]

One JSON line per frame t of each video of the split: `id` (VIDEO_t), `image` (frame t's
file), `next_image` (frame min(t + offset, last): LAPA's clamp), `instruction` (the video's
label from the SthV2 label files), `split`, and `delta`, the latent action of the pair: the
codes as strings for a discrete model (a converted LAQ, or nsvq), the continuous action as
floats for a Gaussian one. Frames are fed as the model was trained (its size and resize);
the offset is the model's training offset unless --offset says otherwise. A pair whose frames
cannot be read is left out and counted. Lines are appended in a fixed order and flushed batch
by batch: run the same command again after an interruption and it continues after the last
line written (FILE.jsonl.meta.json holds the settings it must be continued with).
"""
import argparse
import json
import os

from errors import ConfigError, run_main
from options import Formatter, check_exist


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--model", required=True,
                        help="a latent action model of this repository (convert_laq.py makes "
                             "one of a LAQ checkpoint)")
    parser.add_argument("--data-path", required=True,
                        help="SthV2 frames (<video_id>/img_00001.jpg) or packed shards, with "
                             "the label files beside them (or --labels-path)")
    parser.add_argument("--labels-path", default="",
                        help="folder of the SthV2 label JSONs (default: --data-path)")
    parser.add_argument("--out", required=True, help="the JSON-lines file to write")
    parser.add_argument("--offset", type=int,
                        help="frames between t and its future frame (default: the model's "
                             "data_params.frame_offset)")
    parser.add_argument("--split", choices=["train", "val", "all"], default="all",
                        help="which videos (the split of the label files)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per batch")
    parser.add_argument("--workers", type=int, default=4, help="data loading processes")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or (args.offset is not None and args.offset < 1):
        parser.error("--batch-size and --offset must be >= 1, --workers >= 0")
    return args


class Indexed:
    """Items of a pair dataset with their position: (position, pair or None, bad paths)."""

    def __init__(self, dataset, start):
        self.dataset, self.start = dataset, start

    def __len__(self):
        return len(self.dataset) - self.start

    def __getitem__(self, i):
        pair, bad = self.dataset[self.start + i]
        return self.start + i, pair, bad


def collate(items):
    import torch
    readable = [(i, pair) for i, pair, _ in items if pair is not None]
    return ([i for i, _ in readable],
            torch.stack([pair for _, pair in readable]) if readable else None,
            [bad[0] if bad else "unreadable" for _, pair, bad in items if pair is None])


def resume_point(out, settings, ids):
    """How many items of `ids` are written already: none for a new file; else the file must
    have been written with these `settings`, and it continues after its last complete line
    (a line cut short by a kill is removed)."""
    meta = out + ".meta.json"
    if not os.path.exists(out):
        return 0
    try:
        with open(meta) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(f"--out {out} exists and was not written by label_actions.py (no "
                          f"readable {meta}); remove it or choose another --out") from None
    changed = [k for k in settings if saved.get(k) != settings[k]]
    if changed:
        differ = ", ".join(f"{k} {saved.get(k)!r} there, {settings[k]!r} now" for k in changed)
        raise ConfigError(f"--out {out} was written with other settings ({differ}); run with "
                          f"those to continue it, or choose another --out")
    with open(out, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1                # the last complete line
        f.truncate(end)
    lines = data[:end].splitlines()
    if not lines:
        return 0
    try:
        last = json.loads(lines[-1])["id"]
        return ids.index(last) + 1
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--out {out}: its last line is not one of this split's labels; "
                          f"remove it or choose another --out") from None


def main(args):
    check_exist(args, "--model", "--data-path", "--labels-path")
    import torch
    from torch.utils.data import DataLoader

    from config import data_params_of
    from dataset_sthv2 import build_split
    from errors import CheckpointError
    from evaluation import load_model
    from files import atomic_write
    from frame_index import load_index
    from labels import read_instructions
    from models import image_channels
    from parallel import progress

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(args.model, device)
    if not hasattr(model, "infer_actions"):
        raise CheckpointError(f"--model {args.model} is a {ckpt['config']['model_params']['name']}:"
                              f" latent action labels come from a latent action model")
    if not model.bottleneck.reads_action:
        raise CheckpointError(f"--model {args.model} has no action (bottleneck none): "
                              f"there is nothing to label")
    config = ckpt["config"]
    d = data_params_of(config, data_path=args.data_path, labels_path=args.labels_path or None,
                       frame_stride=1)
    offset = args.offset or d.frame_offset
    index = load_index(d.data_path, d.index_cache_dir)
    splits = ["train", "val"] if args.split == "all" else [args.split]
    datasets = [build_split(d, split, model.image_size, index, pair_offset=offset,
                            clamp_pairs=True, channels=image_channels(config["model_params"]))
                for split in splits]
    instructions = read_instructions(d.labels_path or d.data_path)
    if not instructions:
        print(f"warning: no SthV2 label files in {d.labels_path or d.data_path}: every "
              f"instruction is null", flush=True)
    items = [(split, ds, i) for split, ds in zip(splits, datasets) for i in range(len(ds))]
    ids = [f"{index.videos[int(ds.video[i])]}_{int(ds.pos[i])}" for _, ds, i in items]
    settings = {"model": os.path.abspath(args.model), "data_path": os.path.abspath(d.data_path),
                "split": args.split, "offset": offset, "pairs": len(items),
                "resize": d.resize, "image_size": model.image_size}
    done = resume_point(args.out, settings, ids)
    with atomic_write(args.out + ".meta.json", "w") as f:
        json.dump(settings, f, indent=1)
    if done:
        print(f"{args.out}: {done} of {len(items)} pairs labelled already"
              + ("; continuing" if done < len(items) else ": nothing to do"), flush=True)
    skipped, first_bad = 0, None
    bar = progress(total=len(items), initial=done, desc="labelling", unit="pair")
    with open(args.out, "a") as out:
        base = 0
        for split, ds in zip(splits, datasets):
            start = max(0, done - base)
            base += len(ds)
            if start >= len(ds):
                continue
            loader = DataLoader(Indexed(ds, start), batch_size=args.batch_size,
                                num_workers=args.workers, collate_fn=collate)
            for positions, pairs, bad in loader:
                skipped += len(bad)
                first_bad = first_bad or (bad[0] if bad else None)
                if pairs is not None:
                    x = pairs.to(device).float() / 127.5 - 1
                    with torch.no_grad():
                        _, _, latents = model.evaluate_batch(x)
                    discrete = "codes" in latents                # else the Gaussian's mean
                    actions = latents["codes"] if discrete else latents["mu"]
                    for i, action in zip(positions, actions.cpu().tolist()):
                        v, pos = int(ds.video[i]), int(ds.pos[i])
                        vid = index.videos[v]
                        out.write(json.dumps({
                            "id": f"{vid}_{pos}", "image": index.frame_path(v, pos),
                            "next_image": index.frame_path(v, ds.second(v, pos)),
                            "instruction": instructions.get(vid), "split": split,
                            "delta": [str(c) for c in action] if discrete else action}) + "\n")
                    out.flush()
                bar.update(len(positions) + len(bad))
    bar.close()
    print(f"wrote {args.out}: {len(items) - skipped} pairs labelled"
          + (f", {skipped} left out (unreadable frames, e.g. {first_bad})" if skipped else "")
          + f"; {model.bottleneck_name} actions of {model.code_seq_len} tokens, offset {offset}")


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
