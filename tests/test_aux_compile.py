"""The aux compiler: stripped Aux-NAS costs what the plain single-task model costs, refuses to
strip while the primary still leans on auxiliary features, and records what it removed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_runner import assert_main_user_error, run_cli
from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.strip import strip
from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.nets import build_network

SEG, NORMALS, DEPTH = (TaskHead("seg", "segmentation", "dense", 5), TaskHead("normals", "normals", "dense", 3),
                       TaskHead("depth", "depth", "dense", 1))
SIZE = 32


def spec(method: str, tasks, **options) -> ArchSpec:
    return ArchSpec(method=method, backbone="resnet10", image_size=SIZE, tasks=tasks, head_channels=8,
                    primary=["seg"], options=options)


def bundle_of(model, tmp: Path, name: str, outputs: list[str]) -> dict:
    tasks = [{"name": n, "kind": "segmentation"} for n in outputs]
    path = write_bundle(tmp / name, model=model, name=name, method="x", input_shape=(1, 3, SIZE, SIZE),
                        mean=[0.0] * 3, std=[1.0] * 3, tasks=tasks, parity_inputs=torch.randn(2, 3, SIZE, SIZE))
    return json.loads((path / "manifest.json").read_text())


def converged_aux_nas(tasks) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_network(spec("aux_nas", tasks))
    with torch.no_grad():
        for key, logit in model.alpha_logits.items():
            logit.fill_(-30.0 if key.startswith("b0_") else 2.0)  # alpha^P ~ 1e-13, alpha^A ~ 0.88
        for op in model.fusions.values():
            torch.nn.init.normal_(op.conv.weight, std=0.1)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [[SEG, NORMALS], [SEG, NORMALS, DEPTH]], ids=["K=1", "K=2"])
def test_stripped_bundle_costs_single_task_cost(tasks, tmp_path):
    model = converged_aux_nas(tasks)
    result = strip(model, reference_inputs=torch.randn(4, 3, SIZE, SIZE))
    stripped = bundle_of(result.model, tmp_path, "stripped", result.outputs)
    single = bundle_of(build_network(spec("single", [SEG])).eval(), tmp_path, "single", ["seg"])
    assert result.outputs == ["seg"]
    assert stripped["cost"]["macs"] <= 1.001 * single["cost"]["macs"]
    assert stripped["cost"]["params"] <= 1.001 * single["cost"]["params"]
    assert result.info["strip_drift_max_abs"] < 1e-5
    assert result.info["max_alpha_aux_to_primary"] < 1e-12
    assert sum("auxiliary branch" in s for s in result.info["stripped"]) == len(tasks) - 1


def test_refuses_above_threshold_unless_forced():
    tasks = [SEG, NORMALS]
    model = build_network(spec("aux_nas", tasks)).eval()  # alpha^P = 0.5 at initialisation
    x = torch.randn(2, 3, SIZE, SIZE)
    with pytest.raises(CompileError, match=r"max alpha\^P = 0.5 exceeds strip_threshold 0.01"):
        strip(model, reference_inputs=x)
    forced = strip(model, reference_inputs=x, force=True)
    assert forced.info["strip_forced"] is True and forced.info["max_alpha_aux_to_primary"] == pytest.approx(0.5)
    assert forced.info["strip_drift_max_abs"] == 0  # fusion convs start at zero: cutting them changes nothing yet
    with torch.no_grad():
        for op in model.fusions.values():
            torch.nn.init.normal_(op.conv.weight, std=0.1)
    assert strip(model, reference_inputs=x, force=True).info["strip_drift_max_abs"] > 1e-3  # now it does
    lenient = build_network(spec("aux_nas", tasks, strip_threshold=0.6)).eval()  # the run's own threshold
    kept = strip(lenient, reference_inputs=x)
    assert kept.info["strip_threshold"] == 0.6 and kept.info["strip_forced"] is False and kept.outputs == ["seg"]


@pytest.mark.slow
def test_aux_nas_run_compiles_with_force_through_the_cli(tmp_path):
    run = tmp_path / "aux"
    sets = ["data.size=32", "data.train_size=16", "data.val_size=4", "data.test_size=4", "train.epochs=1",
            "train.batch_size=8", "model.backbone=resnet10", "model.head_channels=8",
            "method.alpha_p_init=0.5"]  # the paper's init: after one tiny epoch alpha^P is still ~0.5
    args = ["train", "configs/aux_nas_seg_normals.yaml", "-o", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert run_cli(*args).returncode == 0
    refused = run_cli("compile", str(run))
    assert refused.returncode == 2 and "strip_threshold" in refused.stderr and "Traceback" not in refused.stderr
    assert run_cli("compile", str(run), "--force").returncode == 0
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["seg"]
    assert manifest["compile"]["strip_forced"] is True and "strip_drift_max_abs" in manifest["compile"]


@pytest.mark.parametrize("recipe, fragment", [
    ("tasks: [{name: seg, kind: segmentation}, {name: seg, kind: normals}]\nprimary: seg\nmethod: aux_nas\n",
     "named twice"),
    ("tasks: [{name: sal, kind: saliency}, {name: normals, kind: normals}]\nprimary: sal\nmethod: aux_nas\n",
     "dataset has no label 'saliency'"),
    ("tasks: [{name: seg, kind: segmentation}, {name: normals, kind: normals}]\nprimary: seg\nmethod: aux_nas\n"
     "model: {backbone: resnet11}\n", "unknown backbone 'resnet11'"),
    ("tasks: [{name: seg, kind: segmentation}, {name: normals, kind: normals}]\nmethod: aux_nas\n",
     "needs `primary:`"),
])
def test_bad_aux_recipes_exit_2(recipe, fragment, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe + "data: {train_size: 8, val_size: 2, test_size: 2, size: 32}\n")
    assert_main_user_error(capsys, fragment, "train", str(path), "-o", str(tmp_path / "run"))


@pytest.mark.slow
def test_aux_nas_recipe_runs_end_to_end_in_one_command(tmp_path):
    """`taskfold run` on the recipe: search → strip → bundle → bench → report, no --force needed."""
    run = tmp_path / "run"
    sets = ["data.size=32", "data.train_size=16", "data.val_size=4", "data.test_size=4", "train.epochs=2",
            "train.batch_size=8", "model.head_channels=8", "bench.iters=2", "bench.warmup=1"]
    args = ["run", "configs/aux_nas_seg_normals.yaml", "-o", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["seg"]
    assert manifest["compile"]["max_alpha_aux_to_primary"] <= 0.01 and not manifest["compile"]["strip_forced"]
    report = (run / "report.md").read_text()
    assert "Architecture parameters" in report and "auxiliary branch normals" in report
