"""arch.json records resolved options (format 2), and an arch.json of the earlier format still compiles.

The fixtures in tests/fixtures/arch_v1/ are the arch.json and config.yaml that `taskfold train`
wrote before arch.json had a format (main at d5fbc97): options as the recipe wrote them
(aux_nas: window 2, alpha_p_init 0.3; dmtg: stem_blocks 1, head_hidden 16).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from taskfold.models.arch import ARCH_FORMAT, ArchSpec
from taskfold.models.nets import build_network
from taskfold.trainer.config import ConfigError, load_config
from taskfold.trainer.methods import create_method
from taskfold.trainer.rundir import RunDir

FIXTURES = Path(__file__).parent / "fixtures" / "arch_v1"


def _state_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("method", ["aux_nas", "dmtg"])
def test_a_format_1_arch_json_rebuilds_the_network_its_run_trained(method):
    old = ArchSpec.load(FIXTURES / method / "arch.json")
    assert old.format == 1 and "format" not in json.loads((FIXTURES / method / "arch.json").read_text())
    cfg = load_config(FIXTURES / method / "config.yaml")
    resolved = dataclasses.asdict(create_method(cfg.method).options)
    assert set(old.options) < set(resolved)  # format 1 kept only what the recipe wrote
    new = dataclasses.replace(old, options=resolved, format=ARCH_FORMAT)
    torch.manual_seed(0)
    built_old = build_network(old)
    torch.manual_seed(0)
    built_new = build_network(new)
    assert _state_shapes(built_old) == _state_shapes(built_new)
    if method == "aux_nas":  # the recipe's own values, not the defaults, reach the network
        assert built_old.options.window == 2
        assert float(torch.sigmoid(built_old.alpha_logits["b0_1"][0].detach())) == pytest.approx(0.3)
    else:
        assert len(built_old.stem) == 2 and built_old.heads["cls"].num_layers == 2


@pytest.mark.parametrize("method", ["aux_nas", "dmtg"])
def test_a_format_1_run_still_compiles(method, tmp_path):
    from taskfold.compiler.compile_run import compile_run

    run = tmp_path / method
    (run / "checkpoints" / "last").mkdir(parents=True)
    for name in ("arch.json", "config.yaml"):
        shutil.copy(FIXTURES / method / name, run / name)
    (run / "metrics.jsonl").write_text("")
    torch.manual_seed(0)
    model = build_network(ArchSpec.load(run / "arch.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(RunDir(run).weights_path()))
    bundle = compile_run(run, force=True)  # force: the fixture has no test record and untrained alphas
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["compile"]["onnx_parity_max_abs"] <= manifest["compile"]["parity_tol"]
    want = ["seg"] if method == "aux_nas" else ["seg", "normals", "cls"]  # Aux-NAS keeps the primary only
    assert [t["name"] for t in manifest["tasks"]] == want


def test_a_new_run_records_every_option_resolved(tmp_path):
    from taskfold.trainer.data import create_dataset
    from taskfold.trainer.components import build_spec, build_tasks

    cfg = load_config(FIXTURES / "dmtg" / "config.yaml")
    method = create_method(cfg.method)
    info = create_dataset("synthscenes", "train", size=32, num_samples=2, seed=0).info
    spec = build_spec(cfg, build_tasks(cfg, info), method)
    spec.save(tmp_path / "arch.json")
    saved = json.loads((tmp_path / "arch.json").read_text())
    assert saved["format"] == ARCH_FORMAT == 3 and saved["dense_head"] is None  # the recipe names none
    assert saved["options"] == dataclasses.asdict(method.options)
    assert saved["options"]["tau"] == 2.5 and saved["options"]["stem_blocks"] == 1  # a default and a recipe value


def test_an_arch_json_from_a_newer_taskfold_is_one_clear_error(tmp_path):
    raw = json.loads((FIXTURES / "dmtg" / "arch.json").read_text())
    (tmp_path / "arch.json").write_text(json.dumps({**raw, "format": ARCH_FORMAT + 1}))
    with pytest.raises(ConfigError, match=f"format {ARCH_FORMAT + 1} is not one this taskfold reads"):
        RunDir(tmp_path).load_arch()
