"""Strict config: every malformed config is one clear line naming the key, before training."""
import copy
import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import yaml

from config import SECTIONS, config_from_dict, load_config
from conftest import ROOT, run_in_process, tiny_config, write_config
from errors import ConfigError


@pytest.fixture
def raw(demo_data, tmp_path):
    return tiny_config(demo_data, str(tmp_path / "logs"))


def error_of(raw_cfg, world_size=1):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw_cfg, world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_seed_config_keeps_the_seed_values(demo_data):
    cfg = load_config(f"{ROOT}/config_vae_sthv2.yaml", [f"data_params.data_path={demo_data}"])
    assert cfg.model_params == {"name": "VanillaVAE", "in_channels": 3, "latent_dim": 256,
                                "hidden_dims": [64, 128, 256, 512, 1024], "image_size": 256}
    d, e, t, lg = cfg.data_params, cfg.exp_params, cfg.trainer_params, cfg.logging_params
    assert (d.image_size, d.train_batch_size, d.val_batch_size, d.num_workers, d.pin_memory) \
        == (256, 64, 64, 4, True)
    assert d.resize == "stretch"                      # fed as LAQ is trained (compare_with_laq)
    assert (e.LR, e.weight_decay, e.scheduler_gamma, e.kld_weight, e.max_grad_norm) \
        == (1e-4, 0.0, 0.95, 1e-4, 1.0)               # 1e-4 is read as a float, not a string
    assert (t.gpus, t.max_epochs, t.gradient_clip_val, t.check_val_every_n_epoch,
            t.log_every_n_steps, t.sync_batchnorm) == (-1, 200, 1.0, 1, 50, False)
    assert (lg.save_dir, lg.name, lg.save_every_n_steps, lg.log_images_every_n_steps) \
        == ("logs_vae", "VanillaVAE_sthv2", 5000, 5000)


def test_demo_config_is_valid(demo_data):
    cfg = load_config(f"{ROOT}/configs/demo.yaml", [f"data_params.data_path={demo_data}"])
    assert cfg.model_params["image_size"] == cfg.data_params.image_size == 64


@pytest.mark.parametrize("mutate,expected", [
    (lambda c: c["exp_params"].update(learning_rate=1.0), "exp_params.learning_rate: unknown key"),
    (lambda c: c["model_params"].update(dropout=0.1), "model_params.dropout: unknown key"),
    (lambda c: c["data_params"].update(train_batch_size="64"),
     "data_params.train_batch_size: expected int, got str"),
    (lambda c: c["data_params"].update(pin_memory="yes"), "data_params.pin_memory: expected bool"),
    (lambda c: c["trainer_params"].update(max_epochs=2.5), "trainer_params.max_epochs: expected int"),
    (lambda c: c["model_params"].update(hidden_dims=[8, "x"]), "model_params.hidden_dims[1]"),
    (lambda c: c.pop("exp_params"), "exp_params: missing section"),
    (lambda c: c.update(extra_params={}), "extra_params: unknown section"),
    (lambda c: c["data_params"].pop("data_path"), "data_params.data_path: missing"),
    (lambda c: c["data_params"].update(data_path="/no/such/dir"), "/no/such/dir' does not exist"),
    (lambda c: c["exp_params"].update(LR=-1e-3), "exp_params.LR: must be positive"),
    (lambda c: c["exp_params"].update(LR=float("inf")), "exp_params.LR: must be a finite number"),
    (lambda c: c["data_params"].update(image_size=64), "differs from model_params.image_size"),
    (lambda c: (c["model_params"].update(image_size=34), c["data_params"].update(image_size=34)),
     "not divisible by 2^len(hidden_dims) = 4"),
    (lambda c: c["trainer_params"].update(precision="bf32"), "trainer_params.precision: expected one of"),
    (lambda c: (c["exp_params"].update(max_grad_norm=0.5),
                c["trainer_params"].update(gradient_clip_val=1.0)),
     "trainer_params.gradient_clip_val: 1.0 disagrees with exp_params.max_grad_norm 0.5"),
    (lambda c: c["trainer_params"].update(gradient_clip_val=-1.0),
     "trainer_params.gradient_clip_val: must be >= 0, got -1.0"),
    (lambda c: c["model_params"].update(name="NoSuchVAE"), "model_params.name: unknown model"),
    (lambda c: c["data_params"].update(dataset="celeba", resize="stretch"),
     "data_params.resize: applies to SthV2 frames"),
    (lambda c: c["data_params"].update(resize="squash"), "data_params.resize: expected one of"),
    (lambda c: (c["model_params"].update(name="VAEGAN", feature_layer=1),
                c["trainer_params"].update(precision="fp16")),
     "trainer_params.precision: fp16 is not available for VAEGAN"),
])
def test_malformed_configs_name_the_key(raw, mutate, expected):
    mutate(raw)
    assert expected in error_of(raw)


def test_the_seed_configs_aliases_take_the_value_they_name(raw):
    """data_params.image_size and trainer_params.gradient_clip_val name model_params.image_size
    and exp_params.max_grad_norm: unset, they are those values; set, they must agree."""
    raw["data_params"].pop("image_size", None)
    raw["trainer_params"].pop("gradient_clip_val", None)
    raw["exp_params"]["max_grad_norm"] = 0.25
    cfg = config_from_dict(raw, check_paths=False)
    assert cfg.data_params.image_size == raw["model_params"]["image_size"]
    assert cfg.trainer_params.gradient_clip_val == 0.25
    raw["trainer_params"]["gradient_clip_val"] = 0.25
    assert config_from_dict(raw, check_paths=False).exp_params.max_grad_norm == 0.25


def test_a_range_rule_is_checked_before_the_model_families_load(raw, tmp_path):
    """Each section's own rules are beside its fields and checked as it is built, so precheck
    (no torch, no model) reports them too."""
    from config import precheck
    raw["trainer_params"]["log_every_n_steps"] = 0
    with pytest.raises(ConfigError, match=r"trainer_params.log_every_n_steps: must be positive, "
                                          r"got 0$"):
        precheck(write_config(tmp_path / "c.yaml", raw))


def test_global_batch_must_split_over_processes(raw):
    raw["data_params"]["train_batch_size"] = 6
    assert "not divisible by the 4 processes" in error_of(raw, world_size=4)


def test_overrides_are_type_checked_and_applied(raw, tmp_path):
    path = write_config(tmp_path / "c.yaml", raw)
    cfg = load_config(path, ["exp_params.LR=3e-4", "trainer_params.sync_batchnorm=true",
                             "model_params.hidden_dims=[4,8]"])
    assert cfg.exp_params.LR == 3e-4 and cfg.trainer_params.sync_batchnorm is True
    assert cfg.model_params["hidden_dims"] == [4, 8]
    with pytest.raises(ConfigError, match=r"^--set exp_params.LR: expected float, got str"):
        load_config(path, ["exp_params.LR=fast"])
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(path, ["LR=1"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("model_params: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_cli_reports_config_errors_in_one_line_before_training(raw, tmp_path):
    raw["data_params"]["num_workers"] = "four"
    path = write_config(tmp_path / "c.yaml", raw)
    result = run_in_process("train_single_gpu.py", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: data_params.num_workers: expected int, got str 'four'"]
    assert not (tmp_path / "logs").exists()


WRONG_VALUES = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                         st.floats(allow_nan=True), st.none())


def _fields():
    return [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_fields()), value=WRONG_VALUES)
def test_property_any_wrong_value_is_a_one_line_error_or_accepted_safely(raw, field, value):
    """Whatever lands in a key, loading either raises a one-line ConfigError naming that key
    or yields a value of the declared type; it never crashes with anything else."""
    section, key = field
    bad = copy.deepcopy(raw)
    bad[section][key] = value
    try:
        cfg = config_from_dict(bad)
    except ConfigError as e:
        assert f"{section}.{key}" in str(e) and "\n" not in str(e)
        return
    got = getattr(getattr(cfg, section), key)
    declared = typing.get_type_hints(SECTIONS[section])[key]
    if typing.get_origin(declared) is typing.Literal:
        assert got in typing.get_args(declared)
    elif declared is float:
        assert isinstance(got, float) and math.isfinite(got)
    else:
        assert isinstance(got, declared) and not (declared is int and isinstance(got, bool))


def test_hostile_config_files_are_one_line_errors(raw, tmp_path):
    import time
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"                                 # 9^10 strings if expanded
    bomb.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "exp_params"})
                    + "exp_params:\n  LR: [" + ", ".join(levels) + "]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(str(bomb))
    assert time.monotonic() - started < 60 and len(str(info.value)) < 400   # expanded: hours
    assert "exp_params.LR: expected float" in str(info.value)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(str(binary))
    listed = tmp_path / "list.yaml"
    listed.write_text("- model_params\n- data_params\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections, not a list"):
        load_config(str(listed), ["exp_params.LR=1e-3"])


def test_a_bad_set_value_names_set_not_the_file(raw, tmp_path):
    path = write_config(tmp_path / "c.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"data_params.data_path={tmp_path / 'nope'}"])
    assert str(info.value).startswith("--set data_params.data_path: folder")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["exp_params.LR=-1"])
    assert str(info.value) == "--set exp_params.LR: must be positive, got -1.0"
    with pytest.raises(ConfigError) as info:                      # the file's own mistake
        load_config(write_config(tmp_path / "d.yaml", {**raw, "exp_params": {"LR": -1.0}}))
    assert str(info.value).startswith(str(tmp_path / "d.yaml"))
