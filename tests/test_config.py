"""Config validation: every bad field is named, overrides reach nested fields and list items."""
from __future__ import annotations

import pytest

from taskfold.trainer.config import ConfigError, config_from_dict, load_config

BASE = {"tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"}]}


def test_defaults_and_shorthand_method():
    cfg = config_from_dict({**BASE, "method": "shared"})
    assert cfg.method == {"name": "shared"} and cfg.train.epochs == 5 and cfg.task_names == ["seg", "depth"]


def test_every_problem_is_listed_with_its_path():
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, "modle": {}, "train": {"epochs": "three", "lr": 0.1}, "data": {"sise": 3}})
    msg = str(err.value)
    assert "unknown field 'modle' (did you mean 'model'?)" in msg
    assert "train.epochs: expected an integer, got 'three'" in msg
    assert "unknown field 'data.sise' (did you mean 'size'?)" in msg
    assert "\n" not in msg


def test_overrides_nested_and_list_items():
    cfg = config_from_dict(BASE, ["train.epochs=3", "tasks.1.weight=2.5", "method.num_groups=4", "primary=seg"])
    assert cfg.train.epochs == 3 and cfg.tasks[1].weight == 2.5
    assert cfg.method == {"name": "shared", "num_groups": 4} and cfg.primary == "seg"


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs", "expected KEY=VALUE"),
    ("tasks.7.weight=1", "is not an index"),
    ("train.lr=-1", "train.lr: must be a finite number > 0"),
    ("primary=normals", "primary: 'normals' is not one of the tasks"),
    ("model.dense_head=linear", "model.dense_head: expected one of aspp, dpt"),
])
def test_bad_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(BASE, [override])


def test_task_named_twice():
    with pytest.raises(ConfigError, match="task 'seg' is named twice"):
        config_from_dict({"tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "seg", "kind": "depth"}]})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=[", "is not a valid YAML value"),
    ("train.epochs.x=1", "expected an integer"),
    ("train.log_every=0", "train.log_every: must be >= 1"),
    ("model.options=foo", "model.options: expected a mapping"),
])
def test_malformed_overrides_are_config_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(BASE, [override])


def test_every_component_problem_of_a_recipe_is_named_in_one_error_before_any_data(tmp_path, capsys):
    """Method, weighting, backbone, dataset and task options are all checked before any data is
    rendered, and all their problems come back in one line."""
    from cli_runner import assert_main_user_error

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("""
name: bad
method: {name: aux_nas, lambda_schedule: fast}
weighting: {name: pcgrad, on: layer}
primary: seg
data: {dataset: synthscenes, size: 32, train_size: 8, val_size: 4, test_size: 4, cache_dir: CACHE,
       options: {max_object: 3}}
tasks: [{name: seg, kind: segmentation}, {name: d, kind: depth, options: {loss: l3}}]
model: {backbone: resnet1O}
""".replace("CACHE", str(tmp_path / "cache")))
    from taskfold.cli.main import main

    capsys.readouterr()
    assert main(["train", str(recipe), "-o", str(tmp_path / "run")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    for problem in ("method.lambda_schedule: expected one of paper, reference, got 'fast'",
                    "weighting.on: expected one of params, features, got 'layer'", "unknown backbone 'resnet1O'",
                    "unknown field 'data.options.max_object' (did you mean 'max_objects'?)",
                    "tasks.d.loss: expected one of l1, ssi, got 'l3'"):
        assert problem in line, line
    err_line = "tasks.d.loss: expected one of l1, ssi, got 'l3'"
    recipe.write_text(recipe.read_text().replace("resnet1O", "resnet10").replace("fast", "paper").replace("layer", "features")
                      .replace("max_object:", "max_objects:"))
    assert_main_user_error(capsys, err_line, "train", str(recipe), "-o", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing rendered, nothing written


def test_on_in_a_recipe_is_a_key_not_a_boolean(tmp_path):
    """YAML 1.1 reads `on` as true; recipes read it as the weighting option it is."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("weighting: {name: pcgrad, on: features}\ntasks: [{name: seg, kind: segmentation}]\n")
    cfg = load_config(recipe, ["weighting.on=params"])
    assert cfg.weighting == {"name": "pcgrad", "on": "params"}
    with pytest.raises(ConfigError, match="train.progress: expected true/false, got 'off'"):
        load_config(recipe, ["train.progress=off"])  # only true/false are booleans (YAML 1.2)


def test_a_malformed_compile_entry_is_refused_before_training(tmp_path, capsys):
    """`compile.int8_max_drop` is only read by the compile at the end of `taskfold run`: a typo in it
    must not cost a training run first."""
    from cli_runner import assert_main_user_error

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
data: {dataset: synthscenes, size: 16, train_size: 4, val_size: 2, test_size: 2, cache_dir: CACHE}
tasks: [{name: seg, kind: segmentation}]
model: {backbone: resnet10}
compile: {int8: true, int8_max_drop: [seg.miou=0.01, miou]}
""".replace("CACHE", str(tmp_path / "cache")))
    assert_main_user_error(capsys, "--int8-max-drop 'miou': expected METRIC=VALUE", "run", str(recipe),
                           "-o", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
