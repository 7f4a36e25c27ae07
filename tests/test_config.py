import copy
from pathlib import Path

import pytest
import yaml

from leukflow.core.config import ConfigError, validate_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_schema_defaults_reproduce_the_documented_config():
    documented = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert validate_config({}, check_paths=False) == documented
    # and the documented config is itself complete: validation adds nothing
    assert validate_config(copy.deepcopy(documented), check_paths=False) == documented


def test_minimal_user_config_gets_every_default(tmp_path):
    (tmp_path / "healthy").mkdir()
    (tmp_path / "healthy" / "a.png").write_bytes(b"")
    user = {"datasets": {"mine": {"format": "folders", "root": str(tmp_path)}}, "results_dir": "r"}
    config = validate_config(user, sources=[write_yaml(tmp_path / "my.yaml", user)])
    assert list(config["datasets"]) == ["mine"]
    assert config["segmentation"]["min_area_px"] == 250
    assert config["encoders"]["resnet18"]["lr"] == pytest.approx(1e-4)
    assert set(config["classifiers"]) == {"random_forest", "knn", "svm_rbf"}


def test_unknown_key_is_named_with_the_allowed_keys_and_the_file(tmp_path):
    cfg = {"segmentation": {"min_area": 10}}
    src = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ConfigError, match=r"segmentation\.min_area: unknown key") as err:
        validate_config(cfg, sources=[src])
    assert "min_area_px" in str(err.value)
    assert str(src) in str(err.value)


def test_wrong_type_names_expected_and_received_value(tmp_path):
    cfg = {"folds": {"k": "five"}}
    src = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(
        ConfigError, match=r"folds\.k: expected a value of type integer; got 'five'"
    ):
        validate_config(cfg, sources=[src])


def test_out_of_range_and_enum(tmp_path):
    with pytest.raises(ConfigError, match=r"folds\.k: expected a value >= 2; got 1"):
        validate_config({"folds": {"k": 1}})
    with pytest.raises(ConfigError, match=r"segmentation\.channel: expected one of"):
        validate_config({"segmentation": {"channel": "blue"}})


def test_error_names_the_file_that_sets_the_key(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", {"folds": {"k": 5}})
    over = write_yaml(tmp_path / "over.yaml", {"folds": {"k": 0}})
    with pytest.raises(ConfigError, match=r"folds\.k: .*\(in .*over\.yaml\)"):
        validate_config({"folds": {"k": 0}}, sources=[base, over])


def test_missing_dataset_root_fails_naming_dataset_and_path(tmp_path):
    cfg = {"datasets": {"clinic": {"format": "folders", "root": str(tmp_path / "nowhere")}}}
    src = write_yaml(tmp_path / "my.yaml", cfg)
    with pytest.raises(ConfigError, match=r"datasets\.clinic\.root: expected an existing folder"):
        validate_config(cfg, sources=[src])


def test_demo_root_need_not_exist(tmp_path):
    cfg = {"datasets": {"d": {"format": "demo", "root": str(tmp_path / "later")}}}
    assert validate_config(cfg)["datasets"]["d"]["n_fields"] == 60


def test_listing_some_classifiers_runs_only_those():
    config = validate_config({"classifiers": {"knn": {}}})
    assert config["classifiers"] == {"knn": {"n_neighbors": 5}}


def test_dataset_folder_without_images_fails_naming_the_path(tmp_path):
    empty = tmp_path / "smears"
    (empty / "ALL").mkdir(parents=True)
    (empty / "ALL" / "notes.txt").write_text("no images here")
    cfg = {"datasets": {"clinic": {"format": "folders", "root": str(empty)}}}
    src = write_yaml(tmp_path / "my.yaml", cfg)
    with pytest.raises(ConfigError, match=r"datasets\.clinic\.root: expected a folder of images"):
        validate_config(cfg, sources=[src])
    (empty / "ALL" / "a.png").write_bytes(b"")
    assert validate_config(cfg, sources=[src])["datasets"]["clinic"]["root"] == str(empty)
