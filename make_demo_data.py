"""Generate a small, deterministic synthetic video dataset in the SthV2 frame layout.

Each video shows coloured shapes over a textured background, 240 px high with varying widths
like SthV2: one main shape (the largest) crosses the frame at a steady speed in one of four
directions, and two or three smaller ones bounce off the walls and each other. The video's
action template says which way the main shape moves, so the label follows from the motion
(a feature that carries the motion can predict it; one that does not stays at chance). Writes
`OUT/<video_id>/img_00001.jpg ...` and the two SthV2 label JSON files, or with --format webm
the clips as SthV2's download holds them (VP9 .webm at 12 fps) for prepare_sthv2.py.

    python make_demo_data.py --out data/demo_sthv2 [--videos 384] [--frames 8] [--seed 0] [--width W]
    python make_demo_data.py --out data/demo_webm --format webm [--videos 384] [--frames 45]
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from errors import run_main
from files import atomic_write
from options import about

HEIGHT = 240
WEBM_VIDEOS = "20bn-something-something-v2"          # the folder SthV2's download unpacks to
WIDTHS = (320, 352, 427)
COLOURS = [(230, 60, 50), (50, 160, 230), (250, 200, 40), (60, 190, 90), (180, 80, 200),
           (240, 130, 40), (245, 245, 245), (30, 30, 30)]
# template -> direction (x, y) of the main shape in image coordinates (y grows downwards)
ACTIONS = {"Pushing [something] from left to right": (1, 0),
           "Pushing [something] from right to left": (-1, 0),
           "Moving [something] up": (0, -1),
           "Moving [something] down": (0, 1)}


def background(rng, width):
    """Smooth colour gradient plus stripes and grain, so frames are not flat."""
    y, x = np.mgrid[0:HEIGHT, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    tilt = rng.uniform(-0.3, 0.3, size=(2, 3))
    img = base + x[..., None] * tilt[0] * 0.3 + y[..., None] * tilt[1] * 0.3
    period, angle = rng.uniform(12, 40), rng.uniform(0, np.pi)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    img += stripes[..., None] * rng.uniform(4, 10)
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def simulate(rng, width, frames, direction):
    """Positions of the shapes, (frames, n, 2), and their radii. Shape 0, the main one,
    crosses 60% of the frame along `direction` at a steady speed and passes over the others;
    shapes 1.. bounce elastically off the walls and each other."""
    n = int(rng.integers(2, 4))
    radius = np.concatenate([[rng.uniform(45, 60)], rng.uniform(20, 30, size=n - 1)])
    size = np.array([width, HEIGHT], dtype=np.float64)
    pos = np.stack([rng.uniform(radius, width - radius), rng.uniform(radius, HEIGHT - radius)], 1)
    vel = rng.uniform(-9, 9, size=(n, 2))
    direction = np.asarray(direction, dtype=np.float64)
    axis = int(np.flatnonzero(direction)[0])
    start = np.where(direction > 0, 0.2, 0.8) * size
    pos[0, axis] = start[axis]
    vel[0] = direction * 0.6 * size[axis] / max(frames - 1, 1)
    track = []
    for _ in range(frames):
        track.append(pos.copy())
        pos += vel
        for k in range(2):
            low, high = pos[1:, k] < radius[1:], pos[1:, k] > size[k] - radius[1:]
            vel[1:][low | high, k] *= -1
            pos[1:, k] = np.clip(pos[1:, k], radius[1:], size[k] - radius[1:])
        for i in range(1, n):
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


def plan_video(rng, frames, direction, width=None):
    """Everything a video shows: width, background, tracks and radii, shape kinds, colours."""
    width = int(rng.choice(WIDTHS)) if width is None else width
    bg = background(rng, width)
    track, radius = simulate(rng, width, frames, direction)
    kinds = rng.integers(0, 3, size=len(radius))
    colours = [COLOURS[c] for c in rng.choice(len(COLOURS), size=len(radius), replace=False)]
    return {"width": width, "background": bg, "track": track, "radius": radius, "kinds": kinds,
            "colours": colours}


def render_frames(plan):
    """The video's frames as PIL images."""
    track, radius, kinds, colours = plan["track"], plan["radius"], plan["kinds"], plan["colours"]
    for t in range(len(track)):
        img = Image.fromarray(plan["background"])
        draw = ImageDraw.Draw(img)
        for i in list(range(1, len(radius))) + [0]:          # the main shape on top
            (cx, cy), r = track[t][i], radius[i]
            box = (cx - r, cy - r, cx + r, cy + r)
            if kinds[i] == 0:
                draw.ellipse(box, fill=colours[i], outline=(0, 0, 0), width=2)
            elif kinds[i] == 1:
                draw.rectangle(box, fill=colours[i], outline=(0, 0, 0), width=2)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colours[i])
        yield img


def render_video(out_dir, plan):
    os.makedirs(out_dir, exist_ok=True)
    for t, img in enumerate(render_frames(plan)):
        img.save(os.path.join(out_dir, f"img_{t + 1:05d}.jpg"), quality=90)


def render_webm(path, plan, fps=12):
    """The video as SthV2 distributes it: VP9 in WebM at 12 fps (PyAV's bundled libvpx)."""
    try:
        import av
    except ImportError:
        raise SystemExit("error: --format webm needs PyAV: pip install av==18.1.0") from None
    with av.open(path, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = plan["width"], HEIGHT, "yuv420p"
        stream.options = {"crf": "20", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
        for img in render_frames(plan):
            container.mux(stream.encode(av.VideoFrame.from_image(img)))
        container.mux(stream.encode())


def video_rng(seed, k):
    return np.random.default_rng([seed, k])


def make_demo_data(out, videos=384, frames=8, seed=0, val_fraction=0.25, width=None,
                   video_format="frames"):
    """Frames: OUT/<id>/img_00001.jpg ... with the label files beside them. webm: as SthV2's
    download unpacks, OUT/20bn-something-something-v2/<id>.webm and OUT/labels/*.json."""
    rng = np.random.default_rng(seed)
    videos_dir, labels_dir = out, out
    if video_format == "webm":
        videos_dir, labels_dir = os.path.join(out, WEBM_VIDEOS), os.path.join(out, "labels")
        os.makedirs(videos_dir, exist_ok=True)
        os.makedirs(labels_dir, exist_ok=True)
    entries = []
    templates = list(ACTIONS)
    for k in range(videos):
        video_id = str(1000 + k)
        template = templates[k % len(templates)]             # balanced classes
        plan = plan_video(video_rng(seed, k), frames, ACTIONS[template], width)
        if video_format == "webm":
            render_webm(os.path.join(videos_dir, f"{video_id}.webm"), plan)
        else:
            render_video(os.path.join(videos_dir, video_id), plan)
        entries.append({"id": video_id, "label": template.replace("[something]", "a shape"),
                        "template": template,
                        "placeholders": ["a shape"] * template.count("[something]")})
    order = rng.permutation(videos)
    n_val = max(1, round(videos * val_fraction))
    val_ids = {entries[i]["id"] for i in order[:n_val]}
    for split, keep in (("train", lambda e: e["id"] not in val_ids),
                        ("validation", lambda e: e["id"] in val_ids)):
        with atomic_write(os.path.join(labels_dir, f"something-something-v2-{split}.json"),
                          "w") as f:
            json.dump([e for e in entries if keep(e)], f, indent=1)
    return out


def main():
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--videos", type=int, default=384)
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["frames", "webm"], default="frames",
                        help="frames: the extracted-frames layout; webm: VP9 clips at 12 fps "
                             "and label JSONs, as SthV2's download looks")
    parser.add_argument("--width", type=int, help="every frame this wide (SthV2's most common: "
                                                   "427); default: 320, 352 or 427 per video")
    args = parser.parse_args()
    if args.videos < 2 or args.frames < 1 or (args.width is not None and args.width < 120):
        parser.error("need at least 2 videos (one per split), 1 frame and a width >= 120")
    make_demo_data(args.out, args.videos, args.frames, args.seed, width=args.width,
                   video_format=args.format)
    if args.format == "webm":
        print(f"wrote {args.videos} .webm videos x {args.frames} frames to "
              f"{os.path.join(args.out, WEBM_VIDEOS)} and the label files to "
              f"{os.path.join(args.out, 'labels')}")
    else:
        print(f"wrote {args.videos} videos x {args.frames} frames to {args.out}")


if __name__ == "__main__":
    run_main(main)
