"""INT8 and FP16 variants of a bundle: made by the compiler, scored per task, guarded, hashed, loaded.

The accuracy guard is tested against *teacher* labels: the test split's targets are replaced by the
FP32 graph's own answers, so FP32 is perfect by construction and any drop is the variant's own
error. That makes a harmful setting (calibration ranges 100x too wide) fail the guard for sure,
on the session's tiny, barely trained demo model too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from taskfold.cli.main import main
from taskfold.compiler.accuracy import OnnxNetwork, parse_max_drops, resolve_limits
from taskfold.compiler.compile_run import held_out_images, precision_data
from taskfold.trainer.data.loader import as_key, load_batch
from taskfold.trainer.components import eval_loader
from taskfold.compiler.errors import CompileError
from taskfold.compiler.fp16 import convert_fp16
from taskfold.compiler.int8 import SCHEMES, head_nodes, quantize_int8
from taskfold.compiler.int8_saturation import MAX_ROUNDING_STEPS, check_saturation, conv2d
from taskfold.compiler.precision import PrecisionPlan, build_variants
from taskfold.runtime import BackendUnavailable, BundleError, InputError, count_onnx, load, write_manifest
from taskfold.runtime.cpu import cpu_kind
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.trainer.config import ConfigError, load_config
from taskfold.trainer.report import precision_section, replace_section
from taskfold.trainer.rundir import RunDir

# Loose on purpose: the session's demo model is trained for one epoch on 48 images; what the guard
# does is tested with teacher labels below.
LOOSE = ["--int8-max-drop", "seg.miou=0.05", "--int8-max-drop", "depth.rmse=0.5", "--int8-max-drop", "normals.mean=5"]
FP16_RELATIVE_TOL = 1e-2  # |FP16 - FP32| <= 1 % of the output's largest magnitude


@pytest.fixture(scope="module")
def precision_bundle(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "bundle"
    assert main(["compile", str(demo_run), "-o", str(out), "--int8", "--fp16", "--calib-images", "32", *LOOSE]) == 0
    return out


@pytest.fixture(scope="module")
def test_images(demo_run: Path) -> np.ndarray:
    return held_out_images(RunDir(demo_run).load_config(), 4).numpy()


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_variants_are_listed_hashed_and_scored_with_the_trainers_metrics(precision_bundle: Path, demo_run: Path):
    manifest = _manifest(precision_bundle)
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        digest = hashlib.sha256((precision_bundle / name).read_bytes()).hexdigest()
        assert manifest["files"][name] == f"sha256:{digest}"
    precisions = manifest["precisions"]
    assert set(precisions) == {"fp32", "int8", "fp16"} and manifest["default_precision"] == "fp32"
    # The FP32 graph, scored by the compiler, reproduces what training measured with PyTorch.
    trained = RunDir(demo_run).test_metrics()
    for task, metrics in trained.items():
        for metric, value in metrics.items():
            assert precisions["fp32"]["metrics"][task][metric] == pytest.approx(value, rel=1e-3, abs=1e-4), (task, metric)
            for variant in ("int8", "fp16"):
                entry = precisions[variant]
                assert entry["delta"][task][metric] == pytest.approx(
                    entry["metrics"][task][metric] - precisions["fp32"]["metrics"][task][metric])
    int8 = precisions["int8"]
    assert int8["scheme"]["per_channel"] and int8["scheme"]["format"] == "QDQ"
    assert int8["scheme"]["target"] == cpu_kind() and int8["scheme"]["calibration_images"] == 32
    assert int8["guard"]["violations"] == [] and len(int8["guard"]["limits"]) == 3
    assert int8["fused_convs"]["int8"] == int8["fused_convs"]["all"] > 0  # every conv runs as an integer kernel
    assert int8["saturation"]["max_step_error"] <= MAX_ROUNDING_STEPS


def test_int8_graph_is_quantised_per_channel(precision_bundle: Path):
    graph = onnx.load(str(precision_bundle / "model.int8.onnx")).graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    for conv in convs:
        weight_dq = producer[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight, scale = inits[weight_dq.input[0]], inits[weight_dq.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weight.dims[0]]
        assert producer[conv.input[0]].op_type == "DequantizeLinear"


def test_int8_bundle_runs_its_int8_graph_close_to_fp32(precision_bundle: Path, test_images: np.ndarray):
    fp32 = load(precision_bundle, precision="fp32", threads=1)(test_images)
    predictor = load(precision_bundle, precision="int8", threads=1)
    assert predictor.precision == "int8" and "precision='int8'" in repr(predictor)
    got = predictor(test_images)
    session = ort.InferenceSession(str(precision_bundle / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    for task, value in got.items():
        np.testing.assert_array_equal(value, session.run([task], {"image": test_images})[0])
        assert np.abs(value - fp32[task]).max() <= 0.05 * np.abs(fp32[task]).max(), task


def test_tampered_int8_graph_is_refused(precision_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(precision_bundle, copy)
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.int8.onnx does not match its sha256"):
        load(copy, precision="fp32")  # every listed file is checked, whichever graph is asked for


def test_fp16_graph_matches_fp32_within_tolerance(precision_bundle: Path, test_images: np.ndarray):
    fp32 = load(precision_bundle, precision="fp32", threads=1)(test_images)
    fp16 = load(precision_bundle, precision="fp16", threads=1)(test_images)
    for task, value in fp32.items():
        assert fp16[task].dtype == np.float32  # FP32 at the edges by default
        assert np.abs(fp16[task] - value).max() <= FP16_RELATIVE_TOL * np.abs(value).max(), task
    graph = onnx.load(str(precision_bundle / "model.fp16.onnx")).graph
    weights = [init for init in graph.initializer if len(init.dims) == 4]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)
    entry = _manifest(precision_bundle)["precisions"]["fp16"]
    assert entry["io"] == "fp32" and max(entry["output_max_abs_diff"].values()) < 1e-2


def test_fp16_io_graph_takes_and_returns_float16(precision_bundle: Path, tmp_path: Path, test_images: np.ndarray):
    copy = tmp_path / "bundle"
    shutil.copytree(precision_bundle, copy)
    convert_fp16(copy / "model.onnx", copy / "model.fp16.onnx", fp16_io=True)
    manifest = _manifest(copy)
    manifest["precisions"]["fp16"]["io"] = "fp16"
    manifest.pop("files")
    write_manifest(copy, manifest)
    predictor = load(copy, precision="fp16", threads=1)
    assert predictor.input_spec["dtype"] == "float16"
    with pytest.raises(InputError, match="expected dtype float16, got float32"):
        predictor(test_images)
    got = predictor(test_images.astype(np.float16))
    reference = load(copy, threads=1)(test_images)
    for task, value in reference.items():
        assert got[task].dtype == np.float16
        assert np.abs(got[task].astype(np.float32) - value).max() <= FP16_RELATIVE_TOL * np.abs(value).max(), task


def _teacher_data(demo_run: Path, bundle: Path):
    """The run's test split with every target replaced by the FP32 graph's own answer."""
    data = precision_data(RunDir(demo_run).load_config(), 16)
    test = data.test.dataset
    images, _ = load_batch(test, range(len(test)))
    out = OnnxNetwork(bundle / "model.onnx")(images)
    targets = {"segmentation": out["seg"].argmax(1), "depth": out["depth"].clamp(min=1e-3),
               "normals": torch.nn.functional.normalize(out["normals"], dim=1)}
    data.test = eval_loader(_Labelled(images, targets), workers=0)
    return data


class _Labelled(torch.utils.data.Dataset):
    """Images with the given targets, in memory (a test split whose labels a test chose)."""

    def __init__(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i = as_key(key).index
        return self.images[i], {name: value[i] for name, value in self.targets.items()}


def _fresh_folder(bundle: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(bundle / "model.onnx", folder / "model.onnx")
    return folder


@pytest.mark.slow
def test_guard_refuses_a_harmful_calibration_naming_task_metric_and_figures(demo_run: Path, demo_bundle: Path,
                                                                              tmp_path: Path):
    data = _teacher_data(demo_run, demo_bundle)
    plan = PrecisionPlan(int8=True, max_drops=parse_max_drops(["depth.delta1=0.05", "normals.mean=1"]))
    good = build_variants(_fresh_folder(demo_bundle, tmp_path / "good"), plan, data)["precisions"]
    assert good["fp32"]["metrics"]["depth"]["delta1"] == 1.0 and good["fp32"]["metrics"]["normals"]["mean"] < 0.01
    assert good["int8"]["guard"]["violations"] == [] and good["int8"]["excluded"]["heads_fp32"] == []

    data.calibration = data.calibration * 100  # ranges 100x too wide: most activations round to zero
    harmful = _fresh_folder(demo_bundle, tmp_path / "harmful")
    with pytest.raises(CompileError, match=r"^INT8 graph refused: depth delta1 1\.0000 -> 0\.\d{4} "
                                           r"\(drop 0\.\d{4} > allowed 0\.0500 = 0\.05\) "
                                           r"\(also with the heads in FP32; all-INT8: depth delta1") as refused:
        build_variants(harmful, plan, data)
    assert "\n" not in str(refused.value)

    plan.force = True
    kept = build_variants(_fresh_folder(demo_bundle, tmp_path / "forced"), plan, data)["precisions"]["int8"]
    assert kept["guard"]["forced"] and kept["guard"]["violations"][0].startswith("depth delta1")
    assert kept["excluded"]["heads_fp32"] == head_nodes(onnx.load(str(demo_bundle / "model.onnx")))


def test_head_nodes_are_the_task_heads(demo_bundle: Path):
    model = onnx.load(str(demo_bundle / "model.onnx"))
    heads = set(head_nodes(model))
    scoped = {node.name for node in model.graph.node
              if any(p.key == "pkg.torch.onnx.name_scopes" and "model.heads." in p.value for p in node.metadata_props)}
    backbone = {node.name for node in model.graph.node if node.name not in scoped}
    assert heads and heads <= scoped and not heads & backbone
    assert {n.name for n in model.graph.node if n.name in scoped and n.op_type == "Conv"} <= heads


def test_max_drop_entries_are_checked_before_anything_slow(demo_run: Path):
    tasks = precision_data(RunDir(demo_run).load_config(), 1).tasks
    assert [(t, m, d.relative) for t, m, d in resolve_limits([], tasks)] == [
        ("seg", "miou", True), ("depth", "rmse", True), ("normals", "mean", True)]
    limits = resolve_limits(parse_max_drops(["mean=2%", "seg.miou=0.01"]), tasks)
    assert [(t, m, d.value, d.relative) for t, m, d in limits] == [("normals", "mean", 0.02, True),
                                                                   ("seg", "miou", 0.01, False)]
    with pytest.raises(CompileError, match="no task 'segm'"):
        resolve_limits(parse_max_drops(["segm.miou=0.1"]), tasks)
    with pytest.raises(CompileError, match=r"no metric 'iou' for task 'seg' \(available: seg.miou, seg.pixel_acc\)"):
        resolve_limits(parse_max_drops(["seg.iou=0.1"]), tasks)
    with pytest.raises(CompileError, match="expected METRIC=VALUE"):
        parse_max_drops(["miou"])


def test_cli_refuses_a_misspelt_metric_in_one_line_and_writes_nothing(demo_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "bundle"
    assert main(["compile", str(demo_run), "-o", str(out), "--int8", "--int8-max-drop", "seg.iou=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metric 'iou' for task 'seg'" in err[0]
    assert not out.exists()


def test_saturation_check_catches_full_range_weights_without_vnni(precision_bundle: Path, demo_run: Path,
                                                                  tmp_path: Path):
    calibration = precision_data(RunDir(demo_run).load_config(), 32).calibration
    quantize_int8(precision_bundle / "model.onnx", tmp_path / "vnni.onnx", calibration, SCHEMES["vnni"])
    report = check_saturation(tmp_path / "vnni.onnx", calibration[:8])
    assert report["convs_checked"] == sum(n.op_type == "Conv" for n in onnx.load(str(tmp_path / "vnni.onnx")).graph.node)
    if cpu_kind() == "avx2":  # VPMADDUBSW: 16-bit pair sums overflow with 8-bit weights
        assert report["saturated"] and report["max_step_error"] > 4 * MAX_ROUNDING_STEPS
    elif cpu_kind() == "vnni":
        assert not report["saturated"]
    # The bundle's graph (7-bit weights on AVX2) is off by rounding only.
    assert check_saturation(precision_bundle / "model.int8.onnx", calibration[:8])["saturated"] == []

    # A VNNI graph in a bundle is refused at load time on a CPU without VNNI.
    copy = tmp_path / "bundle"
    shutil.copytree(precision_bundle, copy)
    shutil.copy(tmp_path / "vnni.onnx", copy / "model.int8.onnx")
    manifest = _manifest(copy)
    manifest["precisions"]["int8"]["scheme"]["target"] = "vnni"
    manifest.pop("files")
    write_manifest(copy, manifest)
    if cpu_kind() == "avx2":
        with pytest.raises(BackendUnavailable, match="quantised for CPUs with VNNI.*--int8-target avx2"):
            load(copy, precision="int8")
    else:
        assert load(copy, precision="int8").precision == "int8"


def test_numpy_conv_reference_matches_torch():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 8, 11, 13)), rng.normal(size=(12, 4, 3, 3)), rng.normal(size=12)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=2,
                                      padding=(1, 2), dilation=2, groups=2).numpy()
    got = conv2d(x, w, b, strides=(2, 2), dilations=(2, 2), pads=(1, 2, 1, 2), group=2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_flops_and_bench_report_the_int8_graph(precision_bundle: Path, capsys):
    fp32 = count_onnx(precision_bundle / "model.onnx")
    int8 = count_onnx(precision_bundle / "model.int8.onnx")
    assert int8.macs_by_precision == {"int8": fp32.macs} and fp32.macs_by_precision == {"fp32": fp32.macs}
    assert int8.params == fp32.params  # quantised weights count as the parameters they replace
    assert count_onnx(precision_bundle / "model.fp16.onnx").macs_by_precision == {"fp16": fp32.macs}
    assert main(["flops", str(precision_bundle), "--precision", "int8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"].endswith("model.int8.onnx") and result["macs_by_precision"] == {"int8": fp32.macs}
    assert main(["bench", str(precision_bundle), "--precision", "int8", "--provider", "cpu", "--batch", "2",
                 "--iters", "2", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["batch"], r["precision"], r["provider"]) for r in rows] == [(2, "int8", "CPUExecutionProvider")]


def test_a_precision_the_bundle_lacks_and_unusable_providers_are_refused(demo_bundle: Path):
    with pytest.raises(BundleError, match=r"has no 'int8' graph; it holds: fp32 \(compile with --int8"):
        load(demo_bundle, precision="int8")
    with pytest.raises(BackendUnavailable, match="unknown provider 'gpu'; available: auto, cpu, cuda, tensorrt"):
        load(demo_bundle, provider="gpu")
    with pytest.raises(BackendUnavailable, match="not both"):
        load(demo_bundle, provider="cpu", providers=["CPUExecutionProvider"])
    if cuda_unavailable_reason() is not None or "CUDAExecutionProvider" not in ort.get_available_providers():
        assert load(demo_bundle, provider="auto").provider == "CPUExecutionProvider"  # auto says what it chose
        with pytest.raises(BackendUnavailable, match="provider 'cuda'"):
            load(demo_bundle, provider="cuda")  # asked by name: never a silent CPU run


def test_report_section_shows_every_variant_and_replaces_itself(precision_bundle: Path, tmp_path: Path):
    manifest = _manifest(precision_bundle)
    section = precision_section(manifest)
    assert section[0].startswith("## Lower precision") and "| task | metric | FP32 | INT8 | Δ INT8 | FP16 | Δ FP16 |" in section
    assert any(line.startswith("| seg | miou |") for line in section)
    assert any(line.startswith("INT8: QDQ, uint8 activations") for line in section)
    report = tmp_path / "report.md"
    report.write_text("# Run\n\n## Test metrics\n\nx\n\n## Training curves\n\ny\n")
    replace_section(report, section[0], section)
    replace_section(report, section[0], section)  # again: replaced, not appended twice
    text = report.read_text()
    assert text.count(section[0]) == 1 and "## Test metrics" in text and "## Training curves" in text


@pytest.mark.parametrize(("override", "message"), [
    ("compile.int8_target=avx512", "compile.int8_target: expected one of auto, avx2, vnni, arm, tensorrt"),
    ("compile.default_precision=int8", "compile.default_precision: int8 needs compile.int8: true"),
    ("compile.calib_images=0", "compile.calib_images: must be >= 1"),
])
def test_compile_fields_are_validated_with_the_recipe(override: str, message: str):
    from taskfold.cli.main import demo_recipe

    with pytest.raises(ConfigError, match=message):
        load_config(demo_recipe(), [override])
