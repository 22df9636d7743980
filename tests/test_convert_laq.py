"""convert_laq.py both ways, and trainer_params.init_from: a LAQ checkpoint in each layout LAPA
writes becomes a checkpoint of this repository that computes the same function; a model trained
here goes back as LAQ's state_dict; a twin starts from the converted weights."""
import re

import pytest
import torch
import yaml

from checkpoint import load_checkpoint
from config import config_from_dict
from config_types import parse_yaml
from conftest import ROOT, run_in_process, tiny_config
from errors import CheckpointError, ConfigError
from evaluation import load_model
from laq_layout import to_laq_state
from latent_action_model import LatentActionModel
from runtime import Runtime
from training import start_from, train

TINY = {"dim": 32, "quant_dim": 4, "codebook_size": 8, "image_size": 32, "patch_size": 8,
        "spatial_depth": 1, "temporal_depth": 2, "dim_head": 16, "heads": 2, "code_seq_len": 4}


def laq_like(seed=0):
    """A model of LAQ's function whose every gain and bias differs from its initial value."""
    torch.manual_seed(seed)
    model = LatentActionModel(**TINY, architecture="laq", bottleneck="nsvq").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gain", "bias")) or ".norm." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def convert(tmp_path, laq_file, *args, out="ours.pt"):
    (tmp_path / "laq.yaml").write_text("image_size: 32\n")
    return run_in_process("convert_laq.py", "--laq", str(laq_file), "--laq-config",
                          str(tmp_path / "laq.yaml"), "--out", str(tmp_path / out), *args)


def pairs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 3, 32, 32, generator=g) * 2 - 1


LAYOUTS = {
    "state_dict": lambda s: s,
    "module.": lambda s: {f"module.{k}": v for k, v in s.items()},
    "trainer package": lambda s: {"model": s, "optim": {}, "steps": 100},
    "ema-pytorch file": lambda s: {**{f"ema_model.{k}": v for k, v in s.items()},
                                   **{f"online_model.{k}": v if k.endswith(".beta") else v + 1
                                      for k, v in s.items()},
                                   "initted": torch.tensor(True), "step": torch.tensor(7)},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_converts_to_the_same_function(tmp_path, layout):
    model = laq_like()
    laq = to_laq_state(model)
    torch.save(LAYOUTS[layout](laq), tmp_path / "laq.pt")
    result = convert(tmp_path, tmp_path / "laq.pt")
    assert result.returncode == 0, result.stderr
    unused = [k for k, v in laq.items()               # LAQ's constants: zero biases, and the
              if k.endswith(".beta") or k.endswith(".null_kv") and v.numel() == 0]  # empty slots
    assert f"{len(laq) - len(unused)} tensors placed, {len(unused)} with no place here" \
        in result.stdout
    converted, ckpt = load_model(str(tmp_path / "ours.pt"), "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    x = pairs()
    mine, theirs = model.evaluate_batch(x), converted.evaluate_batch(x)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[2]["codes"], theirs[2]["codes"])
    params, data, exp = (ckpt["config"][k] for k in ("model_params", "data_params", "exp_params"))
    assert {k: params[k] for k in TINY} == TINY           # code_seq_len read from the convs
    assert (params["architecture"], params["bottleneck"]) == ("laq", "nsvq")
    assert (data["resize"], data["frame_offset"], exp["betas"]) == ("stretch", 30, [0.9, 0.99])
    assert len(ckpt["source"]["no_place"]) == len(unused)


def test_the_online_weights_of_an_ema_file(tmp_path):
    laq = to_laq_state(laq_like())
    torch.save(LAYOUTS["ema-pytorch file"](laq), tmp_path / "laq.pt")
    result = convert(tmp_path, tmp_path / "laq.pt", "--laq-weights", "online")
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(str(tmp_path / "ours.pt"))["model"]
    assert torch.equal(state["bottleneck.codebook"], laq["vq.codebooks"] + 1)


def test_back_to_laq_gives_every_key_and_the_arguments(tmp_path):
    laq = to_laq_state(laq_like())
    torch.save(laq, tmp_path / "laq.pt")
    assert convert(tmp_path, tmp_path / "laq.pt").returncode == 0
    result = run_in_process("convert_laq.py", "--to-laq", str(tmp_path / "ours.pt"), "--out",
                            str(tmp_path / "back.pt"))
    assert result.returncode == 0, result.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == laq.keys()
    assert all(torch.equal(back[k], laq[k]) for k in laq)
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == {**TINY, "channels": 3}


def one_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_what_does_not_fit_is_one_line_and_nothing_written(tmp_path):
    laq = to_laq_state(laq_like())
    torch.save(laq, tmp_path / "laq.pt")
    (tmp_path / "wrong.yaml").write_text("image_size: 32\ndim: 64\n")
    line = one_line(run_in_process("convert_laq.py", "--laq", str(tmp_path / "laq.pt"),
                                   "--laq-config", str(tmp_path / "wrong.yaml"),
                                   "--out", str(tmp_path / "ours.pt")))
    assert "dim 64, but the checkpoint's tensors are of dim 32" in line
    beta = next(k for k in laq if k.endswith(".beta"))
    torch.save({**laq, beta: laq[beta] + 1}, tmp_path / "beta.pt")
    assert f"{beta} is not zero" in one_line(convert(tmp_path, tmp_path / "beta.pt"))
    torch.save({k: v for k, v in laq.items() if "dec_spatial_transformer.layers.0.2.to_q" not in k},
               tmp_path / "short.pt")
    assert "1 missing (e.g. ['dec_spatial_transformer.layers.0.2.to_q.weight'])" in \
        one_line(convert(tmp_path, tmp_path / "short.pt"))
    assert not (tmp_path / "ours.pt").exists()
    assert convert(tmp_path, tmp_path / "laq.pt").returncode == 0
    assert re.search(r"ours\.pt exists; pass --overwrite", one_line(convert(tmp_path, tmp_path /
                                                                             "laq.pt")))


def test_a_gaussian_model_is_not_a_laq(tmp_path):
    torch.manual_seed(0)
    model = LatentActionModel(**TINY, bottleneck="gaussian")
    raw = parse_yaml(open(f"{ROOT}/configs/latent_action_sthv2.yaml"))
    raw["model_params"].update(TINY, bottleneck="gaussian")
    raw["data_params"]["image_size"] = TINY["image_size"]
    cfg = config_from_dict(raw, check_paths=False)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "g.pt")
    assert "only a model of architecture laq with bottleneck nsvq is a LAQ" in one_line(
        run_in_process("convert_laq.py", "--to-laq", str(tmp_path / "g.pt"), "--out",
                       str(tmp_path / "back.pt")))


def test_a_twin_starts_from_the_converted_laq_and_resumes_exactly(demo_data, tmp_path):
    """init_from copies what fits by name and shape (all but the Gaussian's own tensors);
    a resumed run continues from its own checkpoint, not from init_from again."""
    torch.save(to_laq_state(laq_like()), tmp_path / "laq.pt")
    assert convert(tmp_path, tmp_path / "laq.pt").returncode == 0
    source = load_checkpoint(str(tmp_path / "ours.pt"))["model"]
    torch.manual_seed(5)
    twin = LatentActionModel(**TINY, bottleneck="gaussian")
    copied, new, unused = start_from(twin, str(tmp_path / "ours.pt"))
    assert set(new) == {k for k in twin.state_dict() if k.startswith("bottleneck.")} == \
        {"bottleneck.to_logvar.weight", "bottleneck.to_logvar.bias", "bottleneck.rate_multiplier"}
    assert unused == ["bottleneck.codebook"] and len(copied) == len(source) - 1
    assert all(torch.equal(twin.state_dict()[k], source[k]) for k in copied)

    def cfg(name, steps):
        raw = tiny_config(demo_data, str(tmp_path / "logs"), **{
            "data_params.frame_offset": 3, "logging_params.name": name,
            "trainer_params.max_steps": steps, "trainer_params.max_epochs": 10,
            "trainer_params.init_from": str(tmp_path / "ours.pt")})
        raw["model_params"] = {"name": "LatentActionModel", **TINY, "bottleneck": "gaussian"}
        return config_from_dict(raw)
    train(cfg("straight", 4), Runtime())
    train(cfg("resumed", 2), Runtime())
    train(cfg("resumed", 4), Runtime(), resume="auto")
    final = {n: load_checkpoint(str(tmp_path / "logs" / n / "checkpoints" / "vae_final.pt"))
             for n in ("straight", "resumed")}
    for key, value in final["straight"]["model"].items():
        assert torch.equal(value, final["resumed"]["model"][key]), key
    # ... and it did start from LAQ: the decoder's output layer moved 4 Adam steps at most
    step = float((final["straight"]["model"]["to_pixels.weight"] - source["to_pixels.weight"])
                 .abs().max())
    assert 0 < step <= 4 * 1e-3 * 1.5


def test_init_from_must_be_a_checkpoint_that_fits(demo_data, tmp_path):
    raw = tiny_config(demo_data, str(tmp_path / "logs"),
                      **{"trainer_params.init_from": str(tmp_path / "none.pt")})
    with pytest.raises(ConfigError, match=r"trainer_params.init_from: .*none.pt' is not a file"):
        config_from_dict(raw)
    torch.save({"model": {"other.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no tensor of .*other.pt fits this model"):
        start_from(LatentActionModel(**TINY), str(tmp_path / "other.pt"))
