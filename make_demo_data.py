"""Generate a small, deterministic synthetic video dataset in the SthV2 frame layout.

Each video shows coloured shapes moving and bouncing off the walls and each other over a
textured background, 240 px high with varying widths like SthV2. Writes
`OUT/<video_id>/img_00001.jpg ...` and the two SthV2 label JSON files.

    python make_demo_data.py --out data/demo_sthv2 [--videos 48] [--frames 16] [--seed 0]
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

HEIGHT = 240
WIDTHS = (320, 352, 427)
COLOURS = [(230, 60, 50), (50, 160, 230), (250, 200, 40), (60, 190, 90), (180, 80, 200),
           (240, 130, 40), (245, 245, 245), (30, 30, 30)]
ACTIONS = ["Pushing [something] from left to right", "Moving [something] up",
           "Pushing [something] so that it slightly moves", "Dropping [something] onto [something]"]


def background(rng, width):
    """Smooth colour gradient plus stripes and grain, so frames are not flat."""
    y, x = np.mgrid[0:HEIGHT, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    tilt = rng.uniform(-0.3, 0.3, size=(2, 3))
    img = base + x[..., None] * tilt[0] * 0.3 + y[..., None] * tilt[1] * 0.3
    period, angle = rng.uniform(12, 40), rng.uniform(0, np.pi)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    img += stripes[..., None] * rng.uniform(8, 25)
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def simulate(rng, width, frames):
    """Positions of 2-4 discs with elastic wall and pairwise collisions; (frames, n, 2)."""
    n = int(rng.integers(2, 5))
    radius = rng.uniform(14, 30, size=n)
    pos = np.stack([rng.uniform(radius, width - radius), rng.uniform(radius, HEIGHT - radius)], 1)
    vel = rng.uniform(-9, 9, size=(n, 2))
    track = []
    for _ in range(frames):
        track.append(pos.copy())
        pos += vel
        for k in range(2):
            limit = (width, HEIGHT)[k]
            low, high = pos[:, k] < radius, pos[:, k] > limit - radius
            vel[low | high, k] *= -1
            pos[:, k] = np.clip(pos[:, k], radius, limit - radius)
        for i in range(n):
            for j in range(i + 1, n):
                d = pos[j] - pos[i]
                dist = np.linalg.norm(d)
                if 0 < dist < radius[i] + radius[j]:
                    normal = d / dist
                    approach = np.dot(vel[i] - vel[j], normal)
                    if approach > 0:                      # equal masses swap normal speed
                        vel[i] -= approach * normal
                        vel[j] += approach * normal
    return np.stack(track), radius


def render_video(out_dir, rng, frames):
    width = int(rng.choice(WIDTHS))
    bg = background(rng, width)
    track, radius = simulate(rng, width, frames)
    kinds = rng.integers(0, 3, size=len(radius))
    colours = [COLOURS[c] for c in rng.choice(len(COLOURS), size=len(radius), replace=False)]
    os.makedirs(out_dir, exist_ok=True)
    for t in range(frames):
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        for (cx, cy), r, kind, colour in zip(track[t], radius, kinds, colours):
            box = (cx - r, cy - r, cx + r, cy + r)
            if kind == 0:
                draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=2)
            elif kind == 1:
                draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=2)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        img.save(os.path.join(out_dir, f"img_{t + 1:05d}.jpg"), quality=90)


def make_demo_data(out, videos=48, frames=16, seed=0, val_fraction=0.25):
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(videos):
        video_id = str(1000 + k)
        render_video(os.path.join(out, video_id), np.random.default_rng([seed, k]), frames)
        template = ACTIONS[k % len(ACTIONS)]
        entries.append({"id": video_id, "label": template.replace("[something]", "a shape"),
                        "template": template,
                        "placeholders": ["a shape"] * template.count("[something]")})
    order = rng.permutation(videos)
    n_val = max(1, round(videos * val_fraction))
    val_ids = {entries[i]["id"] for i in order[:n_val]}
    for split, keep in (("train", lambda e: e["id"] not in val_ids),
                        ("validation", lambda e: e["id"] in val_ids)):
        with open(os.path.join(out, f"something-something-v2-{split}.json"), "w") as f:
            json.dump([e for e in entries if keep(e)], f, indent=1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.videos < 2 or args.frames < 1:
        parser.error("need at least 2 videos (one per split) and 1 frame")
    make_demo_data(args.out, args.videos, args.frames, args.seed)
    print(f"wrote {args.videos} videos x {args.frames} frames to {args.out}")


if __name__ == "__main__":
    main()
