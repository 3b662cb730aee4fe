from pathlib import Path

import pytest
import yaml

from medgen.config import Config, ConfigError, dump_config, load_config, load_config_text

EXAMPLE = Path(__file__).parent.parent / "examples" / "phantom.yaml"


def test_defaults_and_example_agree():
    # the demo shares overlays, and keeps the phantom on the threshold mask (examples/phantom.yaml)
    assert load_config(EXAMPLE) == load_config(None, ["evaluation.share_images=true", "data.brain_mask=threshold",
                                                      "data.bias_correction=none"])
    cfg = load_config()
    assert cfg.data.image_size == 64 and cfg.model.family == "vae"
    assert cfg.sites.train == ["A", "B", "C"] and cfg.sites.heldout == ["D"]
    assert cfg.privacy.enabled is False and cfg.privacy.delta is None


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(EXAMPLE, ["data.image_size=128", "data.spacing_mm=[1, 1, 1.5]",
                                "sites.train=[X, Y]", "privacy.enabled=true", "privacy.delta=1e-6"])
    assert cfg.data.image_size == 128
    assert cfg.data.spacing_mm == (1.0, 1.0, 1.5)
    assert cfg.sites.train == ["X", "Y"] and cfg.privacy.enabled and cfg.privacy.delta == 1e-6


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["federation.rounds=7", "data.root=/data/cohort"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, key, words", [
    ("data.imagesize=64", "data.imagesize", "unknown key; allowed here: allow_external_paths, bias_correction, bids_suffix"),
    ("nonsense.x=1", "nonsense", "unknown key"),
    ("data.image_size=abc", "data.image_size", "valid integer"),
    ("data.image_size=8", "data.image_size", "greater than or equal to 16"),
    ("data.image_size=65", "data.image_size", "multiple of 8"),
    ("model.family=pixelcnn", "model.family", "'vae', 'cevae', 'vqvae', 'gan', 'ddpm' or 'flow'"),
    ("federation.strategy=avg", "federation.strategy", "'fedavg'"),
    ("federation.rounds=0", "federation.rounds", "greater than or equal to 1"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon", "greater than 0"),
    ("privacy.delta=1.5", "privacy.delta", "less than 1"),
    ("data.percentiles=[99, 1]", "data.percentiles", "low < high"),
    ("data.spacing_mm=[1, 1, 0]", "data.spacing_mm", "(0, 10] mm"),
    ("data.on_bad_file=ignore", "data.on_bad_file", "'fail' or 'skip'"),
    ("sites.heldout=[A]", "sites", "never train"),
    ("sites.train=[]", "sites.train", "at least 1"),
    ("seed=-3", "seed", "greater than or equal to 0"),
    # upper bounds (issue 16: train.local_steps=1e15 was accepted)
    ("train.local_steps=1000000000000000", "train.local_steps", "less than or equal to 1000000"),
    ("train.batch_size=1000000", "train.batch_size", "less than or equal to 65536"),
    ("federation.samples_per_class=100000", "federation.samples_per_class", "less than or equal to 256"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"  {key}:" in str(e.value) and words in str(e.value)


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.image_size=1", "model.family=x", "federation.rounds=-1"])
    text = str(e.value)
    assert "data.image_size" in text and "model.family" in text and "federation.rounds" in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"data": {"image_size": 64, "colour": "blue"}}))
    with pytest.raises(ConfigError, match=r"data\.colour: unknown key") as e:
        load_config(bad)
    assert str(bad) in str(e.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["data.image_size"])
    with pytest.raises(ConfigError, match=r"  seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])


def test_schema_rejects_assignment_errors():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.data.image_size = 3


def test_written_ddpm_config_keeps_its_space():
    """The space a DDPM was built in survives a round trip through medgen's config text; text written
    before model.space existed (checkpoints of 2026-12-01 and earlier) is a pixel-space model."""
    for space in ("latent", "pixel"):
        cfg = load_config(None, ["model.family=ddpm", f"model.space={space}"])
        assert load_config_text(dump_config(cfg)).model.space == space
    old = yaml.safe_load(dump_config(load_config(None, ["model.family=ddpm"])))
    del old["model"]["space"]
    assert load_config_text(yaml.safe_dump(old)).model.space == "pixel"
    assert load_config(None, ["model.family=ddpm"]).model.space == "latent"  # a user's config: the default


def test_every_example_config_is_valid():
    for path in sorted(EXAMPLE.parent.glob("*.yaml")):
        load_config(path)  # raises ConfigError naming the key
