"""label_actions.py: LAPA's latent action labels for every frame, from a converted LAQ or a
Gaussian twin; resumable after a kill."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import config_from_dict
from config_types import parse_yaml
from conftest import ROOT, run_in_process
from laq_layout import to_laq_state
from latent_action_model import LatentActionModel

from test_convert_laq import TINY, convert, laq_like


def frame(path, size=32):
    """A frame as LAPA's transform reads it: RGB, stretched to the square, in [0, 1]."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def label(tmp_path, model, data, *args, out="labels.jsonl"):
    return run_in_process("label_actions.py", "--model", str(model), "--data-path", data,
                          "--out", str(tmp_path / out), "--workers", "0", "--batch-size", "4",
                          *args)


def lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def converted(tmp_path):
    torch.save(to_laq_state(laq_like()), tmp_path / "laq.pt")
    assert convert(tmp_path, tmp_path / "laq.pt").returncode == 0
    return tmp_path / "ours.pt"


def test_every_frame_gets_the_codes_of_its_pair(demo_data, tmp_path, converted):
    result = label(tmp_path, converted, demo_data, "--split", "val", "--offset", "4")
    assert result.returncode == 0, result.stderr
    rows = lines(tmp_path / "labels.jsonl")
    val = {e["id"]: e["label"] for e in json.load(
        open(os.path.join(demo_data, "something-something-v2-validation.json")))}
    assert len(rows) == 10 * len(val)                       # every frame of every val video
    assert {r["id"].split("_")[0] for r in rows} == set(val)
    for r in rows:
        vid, t = r["id"].split("_")
        assert r["instruction"] == val[vid] and r["split"] == "val"
        assert r["image"].endswith(f"{vid}/img_{int(t) + 1:05d}.jpg")
        future = min(int(t) + 4, 9)                       # LAPA's clamp to the last frame
        assert r["next_image"].endswith(f"{vid}/img_{future + 1:05d}.jpg")
    model = laq_like()
    some = rows[::7]
    pairs = torch.stack([torch.stack([frame(r["image"]), frame(r["next_image"])]) for r in some])
    codes = model.evaluate_batch(pairs * 2 - 1)[2]["codes"]
    for r, own in zip(some, codes):
        assert r["delta"] == [str(int(c)) for c in own]


def test_an_interrupted_file_continues_where_it_stopped(demo_data, tmp_path, converted):
    assert label(tmp_path, converted, demo_data, out="full.jsonl").returncode == 0
    full = (tmp_path / "full.jsonl").read_bytes()
    (tmp_path / "cut.jsonl").write_bytes(full[:len(full) // 3])        # ends mid-line
    (tmp_path / "cut.jsonl.meta.json").write_bytes((tmp_path / "full.jsonl.meta.json")
                                                   .read_bytes())
    result = label(tmp_path, converted, demo_data, out="cut.jsonl")
    assert result.returncode == 0, result.stderr
    done, total = full[:len(full) // 3].count(b"\n"), full.count(b"\n")
    assert f"{done} of {total} pairs labelled already; continuing" in result.stdout
    assert (tmp_path / "cut.jsonl").read_bytes() == full
    again = label(tmp_path, converted, demo_data, "--offset", "5", out="cut.jsonl")
    assert again.returncode == 2
    assert "was written with other settings (offset 30 there, 5 now)" in again.stderr
    assert (tmp_path / "cut.jsonl").read_bytes() == full                 # left as it was


def twin(tmp_path, bottleneck):
    torch.manual_seed(0)
    model = LatentActionModel(**TINY, bottleneck=bottleneck).eval()
    raw = parse_yaml(open(f"{ROOT}/configs/latent_action_sthv2.yaml"))
    raw["model_params"].update(TINY, bottleneck=bottleneck)
    raw["data_params"].update(image_size=32, frame_offset=3)
    torch.save({"model": model.state_dict(),
                "config": config_from_dict(raw, check_paths=False).to_dict()},
               tmp_path / f"{bottleneck}.pt")
    return model, tmp_path / f"{bottleneck}.pt"


def test_a_gaussian_twin_writes_its_mean_action_as_floats(demo_data, tmp_path):
    model, path = twin(tmp_path, "gaussian")
    assert label(tmp_path, path, demo_data, "--split", "train").returncode == 0
    rows = lines(tmp_path / "labels.jsonl")
    r = rows[5]
    assert r["next_image"].endswith(f"img_{int(r['id'].split('_')[1]) + 3 + 1:05d}.jpg")
    pair = torch.stack([frame(r["image"]), frame(r["next_image"])])[None] * 2 - 1
    mu = model.evaluate_batch(pair)[2]["mu"][0]
    assert len(r["delta"]) == TINY["code_seq_len"] * TINY["quant_dim"]
    assert np.allclose(r["delta"], mu.tolist(), atol=1e-3)     # PIL within 1/255 of ours


def test_a_model_without_an_action_has_nothing_to_label(demo_data, tmp_path):
    _, path = twin(tmp_path, "none")
    result = label(tmp_path, path, demo_data)
    assert result.returncode == 2 and "has no action (bottleneck none)" in result.stderr
    assert not (tmp_path / "labels.jsonl").exists()
