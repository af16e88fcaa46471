"""ONNX export, parity and bundle writing with a real exporter and a real ONNX Runtime."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.export import export_onnx
from taskfold.compiler.parity import check_parity
from taskfold.runtime.bundle import verify_bundle
from taskfold.runtime.outputs import OUTPUT_VALUES

torch.set_num_threads(1)
SIZE = 64


class _TwoTask(nn.Module):
    """timm backbone, a dense head resized to the input size and a global head (dict output)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=0, global_pool="")
        c = self.backbone.num_features
        self.seg_head = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 5, 1))
        self.cls_head = nn.Linear(c, 3)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone.forward_features(image)
        seg = F.interpolate(self.seg_head(f), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        # Deliberately not in the bundle's task order: the exporter must follow output_names.
        return {"cls": self.cls_head(f.mean((2, 3))), "seg": seg}


TASKS = [{"name": "seg", "kind": "segmentation", "classes": 5},
         {"name": "cls", "kind": "classification", "classes": 3}]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = _TwoTask().train()
    with torch.no_grad():  # real running statistics, so folding has something to fold
        for _ in range(3):
            net(torch.randn(4, 3, SIZE, SIZE) * 2 + 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def bundle(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return write_bundle(
        tmp_path_factory.mktemp("b") / "bundle", model=model, name="demo", method="aux_head",
        input_shape=(1, 3, SIZE, SIZE), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], tasks=TASKS,
        parity_inputs=inputs, compile_info={"stripped": ["nothing"]}, provenance={"git_commit": "abc"},
    )


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_graph_has_named_io_dynamic_batch_and_no_batchnorm(bundle: Path) -> None:
    graph = onnx.load(bundle / "model.onnx").graph
    assert [i.name for i in graph.input] == ["image"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert [o.name for o in graph.output] == ["seg", "cls"]
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "manifest.json.sha256", "model.onnx"]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_unfolded_model_at_any_batch(bundle: Path, model: nn.Module, batch: int) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    seg, cls = session.run(["seg", "cls"], {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert seg.shape == (batch, 5, SIZE, SIZE) and cls.shape == (batch, 3)
    assert np.abs(seg - want["seg"].numpy()).max() < 1e-4
    assert np.abs(cls - want["cls"].numpy()).max() < 1e-4


def test_manifest_follows_the_bundle_contract(bundle: Path, model: nn.Module) -> None:
    m = _manifest(bundle)
    assert m["format"] == "taskfold.bundle/1" and m["name"] == "demo" and m["method"] == "aux_head"
    assert m["input"] == {"name": "image", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32",
                          "layout": "NCHW", "mean": [0.5] * 3, "std": [0.25] * 3}
    assert m["tasks"] == [
        {"name": "seg", "kind": "segmentation", "classes": 5, "output": "seg", "shape": [-1, 5, SIZE, SIZE],
         "values": OUTPUT_VALUES["segmentation"]},
        {"name": "cls", "kind": "classification", "classes": 3, "output": "cls", "shape": [-1, 3],
         "values": OUTPUT_VALUES["classification"]},
    ]
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in model.modules())
    c = m["compile"]
    assert c["stripped"] == ["nothing"] and c["bn_folded"] == n_bn and c["bn_remaining"] == 0
    assert 0 <= c["onnx_parity_max_abs"] < 1e-4 and 0 <= c["folded_parity_max_abs"] < 1e-4
    assert set(c["onnx_parity_per_output"]) == {"seg", "cls"}
    assert m["provenance"] == {"git_commit": "abc"} and m["taskfold_version"]
    digest = hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
    assert m["files"] == {"model.onnx": f"sha256:{digest}"}
    manifest_digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert (bundle / "manifest.json.sha256").read_text() == f"{manifest_digest}  manifest.json\n"
    verify_bundle(bundle)


def _torch_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs per top-level child, counted from torch module hooks (Conv: out·Cin/g·k, Linear: out·in)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            top = name.split(".")[0]

            def hook(mod: nn.Module, _: tuple, out: torch.Tensor, top: str = top) -> None:
                per_out = mod.in_features if isinstance(mod, nn.Linear) else (
                    mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])
                macs[top] = macs.get(top, 0) + out.numel() * per_out

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return macs


def test_cost_agrees_with_a_torch_side_count(bundle: Path, model: nn.Module) -> None:
    macs = _torch_macs(model, torch.randn(1, 3, SIZE, SIZE))
    cost = _manifest(bundle)["cost"]
    assert cost["macs"] == macs["backbone"] + macs["seg_head"] + macs["cls_head"]
    assert cost["per_task_macs"] == {"seg": macs["backbone"] + macs["seg_head"],
                                     "cls": macs["backbone"] + macs["cls_head"]}
    # Folding drops BN's weight+bias (2 per channel) and gives each bias-free conv a bias (1 per channel).
    n_bn_channels = sum(x.num_features for x in model.modules() if isinstance(x, nn.BatchNorm2d))
    assert cost["params"] == sum(p.numel() for p in model.parameters()) - n_bn_channels


def test_parity_failure_raises(bundle: Path, model: nn.Module) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.seg_head[3].bias += 0.01
    with pytest.raises(CompileError, match=r"ONNX parity failed: seg differs by 1\.0e-02 > tol 1\.0e-04"):
        check_parity(changed, bundle / "model.onnx", x, tol=1e-4)
    with pytest.raises(CompileError, match="ONNX parity failed: seg differs by"):
        check_parity(model, bundle / "model.onnx", x, tol=-1.0)
    with pytest.raises(CompileError, match=r"ONNX Runtime failed on inputs of shape \(2, 3, 32, 32\)"):
        check_parity(model, bundle / "model.onnx", x[:, :, :32, :32], tol=1e-4)
    diffs = check_parity(model, bundle / "model.onnx", torch.from_numpy(x), tol=1e-4)
    assert list(diffs) == ["seg", "cls"] and max(diffs.values()) < 1e-4


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_failed_compile_leaves_the_previous_bundle_untouched(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = dict(model=_tiny(), name="t", method="m", input_shape=(2, 3, 16, 16), mean=[0.0] * 3,
                std=[1.0] * 3, tasks=[{"name": "y", "kind": "depth"}], parity_inputs=np.zeros((1, 3, 16, 16)))
    write_bundle(out, **args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CompileError, match="a bundle exists there"):
        write_bundle(out, **args)
    with pytest.raises(CompileError, match="ONNX parity failed"):
        write_bundle(out, **args, parity_tol=-1.0, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left behind
    assert _manifest(out)["compile"]["bn_folded"] == 1
    verify_bundle(out)


class _DataDependent(nn.Module):
    """Python control flow on tensor values: no static graph exists for it."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image if image.sum() > 0 else -image


def test_export_errors_are_one_line_compile_errors(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="ONNX export failed") as err:
        export_onnx(_DataDependent(), tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), output_names=["y"])
    assert "\n" not in str(err.value)
    with pytest.raises(CompileError, match="one tensor but 2 output names"):
        export_onnx(_tiny(), tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), output_names=["a", "b"])
    with pytest.raises(CompileError, match=r"lack \['depth'\]"):
        export_onnx(_TwoTask().eval(), tmp_path / "m.onnx", input_shape=(1, 3, 32, 32), output_names=["depth"])


class _BnAfterAdd(nn.Module):
    """A BN fed by a sum cannot be folded: the bundle must say so and still be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(image) + self.b(image))


def test_unfoldable_batchnorm_is_recorded_as_remaining(tmp_path: Path) -> None:
    model = _BnAfterAdd().eval()
    model.bn.running_mean.fill_(0.5)
    model.bn.running_var.fill_(3.0)
    out = write_bundle(tmp_path / "b", model=model, name="t", method="m", input_shape=(1, 3, 8, 8),
                       mean=[0.0] * 3, std=[1.0] * 3, tasks=[{"name": "y", "kind": "depth"}],
                       parity_inputs=torch.randn(2, 3, 8, 8))
    c = _manifest(out)["compile"]
    assert c["bn_folded"] == 0 and c["bn_remaining"] == 1 and c["onnx_parity_max_abs"] < 1e-5
