"""MACs/params counter: torchvision's published numbers, a hand-computed graph, the ORT fallback."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from taskfold.runtime import count_onnx
from taskfold.runtime.flops import OP_COUNTERS
from taskfold.runtime.flops.shapes import inferred_shapes, pin_inputs

# torchvision's model tables: "GFLOPS" (really GMACs) at 224x224.
PUBLISHED_GMACS = {"resnet50": 4.089, "vgg16": 15.470, "mobilenet_v2": 0.301}


@pytest.fixture(scope="module")
def torchvision_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """ONNX exports (BatchNorm kept, so the graph holds torch's parameters) and torch's param count."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    folder = tmp_path_factory.mktemp("torchvision")
    exports = {}
    for name in PUBLISHED_GMACS:
        model = getattr(torchvision.models, name)(weights=None).eval()
        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros(1, 3, 224, 224),), str(path),
                dynamo=False, do_constant_folding=False, input_names=["image"], output_names=["logits"],
            )
        exports[name] = (path, sum(p.numel() for p in model.parameters()))
        del model
    return exports


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_torchvision_macs_and_params(torchvision_exports: dict[str, tuple[Path, int]], name: str) -> None:
    path, torch_params = torchvision_exports[name]
    cost = count_onnx(path)
    assert cost.macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.005)
    assert cost.params == torch_params
    assert cost.per_output_macs == {"logits": cost.macs}
    assert sum(cost.per_op_type.values()) == cost.macs == sum(m for _, _, m in cost.per_node)
    assert not cost.used_onnxruntime_for_shapes


@pytest.mark.slow
def test_resnet50_params_match_torchvision(torchvision_exports: dict[str, tuple[Path, int]]) -> None:
    assert count_onnx(torchvision_exports["resnet50"][0]).params == 25_557_032


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _hand_graph() -> onnx.ModelProto:
    """Grouped conv, depthwise conv, grouped ConvTranspose, Gemm and broadcast MatMuls, two outputs."""
    rng = np.random.default_rng(0)
    inits = [
        _init("w_group", (16, 2, 3, 3), rng), _init("b_group", (16,), rng),
        _init("w_dw", (16, 1, 3, 3), rng), _init("w_up", (16, 2, 2, 2), rng),
        _init("w_fc", (7, 400), rng), _init("b_fc", (7,), rng), _init("w_mix", (4, 16, 5), rng),
        numpy_helper.from_array(np.array([1, 16, 25], np.int64), "tokens_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_group", "b_group"], ["g"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["g", "w_dw"], ["dw"], group=16, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["dw", "w_up"], ["up"], group=2, strides=[2, 2]),
        helper.make_node("Flatten", ["up"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["cls"], transB=1),
        helper.make_node("Reshape", ["dw", "tokens_shape"], ["tokens"]),
        helper.make_node("Transpose", ["tokens"], ["tokens_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tokens", "tokens_t"], ["scores"]),
        helper.make_node("MatMul", ["scores", "w_mix"], ["attn"]),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT, [1, 7]),
         helper.make_tensor_value_info("attn", TensorProto.FLOAT, [4, 16, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_hand_computed_graph() -> None:
    model = _hand_graph()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cls, attn = session.run(["cls", "attn"], {"x": np.zeros((1, 8, 10, 10), np.float32)})
    assert cls.shape == (1, 7) and attn.shape == (4, 16, 5)  # the shapes the formulas below assume

    grouped = 1 * 16 * 10 * 10 * (8 // 4) * 3 * 3  # N·Cout·Hout·Wout·(Cin/g)·kh·kw
    depthwise = 1 * 16 * 5 * 5 * 1 * 3 * 3
    transposed = 1 * 16 * 5 * 5 * (4 // 2) * 2 * 2  # N·Cin·Hin·Win·(Cout/g)·kh·kw
    gemm = 1 * 7 * 400
    scores = 1 * 16 * 16 * 25
    mixed = 4 * 16 * 5 * 16  # (1,16,16) broadcast against (4,16,5)
    cost = count_onnx(model)
    assert cost.per_node == [
        ("Conv_0", "Conv", grouped), ("Conv_1", "Conv", depthwise),
        ("ConvTranspose_2", "ConvTranspose", transposed), ("Gemm_4", "Gemm", gemm),
        ("MatMul_7", "MatMul", scores), ("MatMul_8", "MatMul", mixed),
    ]
    assert cost.macs == 49_920 == grouped + depthwise + transposed + gemm + scores + mixed
    assert cost.per_output_macs == {
        "cls": grouped + depthwise + transposed + gemm,
        "attn": grouped + depthwise + scores + mixed,
    }
    assert cost.per_op_type == {"Conv": grouped + depthwise, "ConvTranspose": transposed,
                                "Gemm": gemm, "MatMul": scores + mixed}
    assert cost.params == 16 * 2 * 9 + 16 + 16 * 9 + 16 * 2 * 4 + 7 * 400 + 7 + 4 * 16 * 5


def _dynamic_reshape_graph() -> onnx.ModelProto:
    """Dynamic batch; the Reshape target goes through Max, which shape inference does not evaluate."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Max", ["s", "ones"], ["target"]),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("MatMul", ["y", "w"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 5])],
        [numpy_helper.from_array(np.ones((8, 5), np.float32), "w"),
         numpy_helper.from_array(np.ones(3, np.int64), "ones")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnxruntime_fallback_resolves_what_inference_cannot() -> None:
    model = _dynamic_reshape_graph()
    _, inferred = inferred_shapes(pin_inputs(model, (4, 6, 8)))
    assert "y" not in inferred  # the premise: ONNX shape inference leaves the MatMul input unknown
    batch4 = count_onnx(model, input_shape=(4, 6, 8))
    assert batch4.used_onnxruntime_for_shapes
    assert batch4.macs == 4 * 6 * 5 * 8
    assert count_onnx(model).macs == 1 * 6 * 5 * 8  # dynamic batch defaults to 1


def test_input_shape_that_contradicts_the_graph_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit input 'x'"):
        count_onnx(_dynamic_reshape_graph(), input_shape=(4, 7, 8))


def test_registry_and_uncounted_ops() -> None:
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul"} <= set(OP_COUNTERS)
    relu_only = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    ))
    cost = count_onnx(relu_only)
    assert (cost.macs, cost.params, cost.per_node, cost.per_output_macs) == (0, 0, [], {"y": 0})


def _quantised_graph() -> onnx.ModelProto:
    """Integer ops (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger), a QDQ-wrapped Conv and a
    float Conv, each with a hand-computable MAC count."""
    rng = np.random.default_rng(0)
    q8 = lambda name, shape: numpy_helper.from_array(rng.integers(-8, 8, size=shape).astype(np.int8), name)  # noqa: E731
    scalar = lambda name, value, dtype: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    inits = [
        q8("w_q", (6, 4, 3, 3)), numpy_helper.from_array(np.full(6, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(6, np.int8), "w_zero"), numpy_helper.from_array(np.zeros(6, np.int32), "b_q"),
        scalar("s", 0.05, np.float32), scalar("z", 128, np.uint8), scalar("s_w", 0.1, np.float32), scalar("z_w", 0, np.int8),
        q8("w_int", (5, 6, 1, 1)), q8("m_q", (8, 3)), q8("m_int", (8, 2)),
        _init("w_float", (2, 6, 3, 3), rng),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("QLinearConv", ["x_q", "s", "z", "w_q", "w_scale", "w_zero", "s", "z", "b_q"], ["c1_q"],
                         pads=[1, 1, 1, 1]),  # (1,6,8,8): 6·8·8·4·9
        helper.make_node("DequantizeLinear", ["c1_q", "s", "z"], ["c1"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["c1_dq_in", "w_dq"], ["c2"], pads=[1, 1, 1, 1]),  # QDQ conv: 6·8·8·4·9
        helper.make_node("ConvInteger", ["c1_q", "w_int", "z"], ["c3"]),  # (1,5,8,8): 5·8·8·6
        helper.make_node("Conv", ["c1", "w_float"], ["c4"], pads=[1, 1, 1, 1]),  # float: 2·8·8·6·9
        helper.make_node("Reshape", ["c1_q", "rows_shape"], ["rows_q"]),
        helper.make_node("QLinearMatMul", ["rows_q", "s", "z", "m_q", "s_w", "z_w", "s", "z"], ["mm_q"]),  # (48,3): 48·3·8
        helper.make_node("MatMulInteger", ["rows_q", "m_int", "z"], ["mm_int"]),  # (48,2): 48·2·8
    ]
    inits += [numpy_helper.from_array(np.array([48, 8], np.int64), "rows_shape")]
    nodes.insert(4, helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["c1_dq_in"]))  # the QDQ conv's input
    outputs = [("c2", TensorProto.FLOAT, [1, 6, 8, 8]), ("c3", TensorProto.INT32, [1, 5, 8, 8]),
               ("c4", TensorProto.FLOAT, [1, 2, 8, 8]), ("mm_q", TensorProto.UINT8, [48, 3]),
               ("mm_int", TensorProto.INT32, [48, 2])]
    graph = helper.make_graph(nodes, "quantised", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(*o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_integer_and_qdq_ops_count_as_int8_macs() -> None:
    model = _quantised_graph()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = [v.shape for v in session.run(None, {"x": np.zeros((1, 4, 8, 8), np.float32)})]
    assert shapes == [(1, 6, 8, 8), (1, 5, 8, 8), (1, 2, 8, 8), (48, 3), (48, 2)]  # what the formulas assume

    qlinear_conv = qdq_conv = 6 * 8 * 8 * 4 * 9
    conv_integer, float_conv = 5 * 8 * 8 * 6, 2 * 8 * 8 * 6 * 9
    qlinear_matmul, matmul_integer = 48 * 3 * 8, 48 * 2 * 8
    cost = count_onnx(model)
    int8 = qlinear_conv + qdq_conv + conv_integer + qlinear_matmul + matmul_integer
    assert cost.macs_by_precision == {"int8": int8, "fp32": float_conv}
    assert cost.macs == int8 + float_conv
    # Quantised weights are parameters, once per consuming node like float ones (w_q feeds QLinearConv
    # and a DequantizeLinear), and so is QLinearConv's int32 bias; scales and zero points are not.
    assert cost.params == 2 * (6 * 4 * 9) + 6 + 5 * 6 + 8 * 3 + 8 * 2 + 2 * 6 * 9
