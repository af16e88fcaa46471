"""`taskfold serve` over real HTTP on loopback: NVIDIA's tritonclient (binary tensors) and plain
JSON requests against the in-process runtime, every endpoint, output subsets, bad requests (each a
4xx with one line), 32 concurrent clients, /metrics, SIGTERM drain; `taskfold export-triton`
configs parsed with Triton's own protobuf schema."""
from __future__ import annotations

import http.client as http_client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cli_runner import ROOT, assert_user_error, run_cli
from taskfold.runtime import load

http = pytest.importorskip("tritonclient.http", reason="the dev extra installs tritonclient[http]")
pytest.importorskip("starlette", reason="the serve extra installs starlette and uvicorn")

MAX_BODY = 2_000_000


def _start(bundle: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`taskfold serve BUNDLE --port 0`; returns the process and its base URL once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    handle = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "taskfold.cli", "serve", str(bundle), "--port", "0",
                             "--max-body-bytes", str(MAX_BODY), "--threads", "1", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=handle)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        if " at http://" in text:
            url = text.split(" at ", 1)[1].split("/v2/models")[0]
            return proc, url
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {text}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def server(demo_bundle: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = _start(demo_bundle, log, "--log-level", "info", "--max-queue-delay-us", "2000")
    yield url, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def _request(url: str, method: str = "GET", body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def _client(url: str):
    return http.InferenceServerClient(url.removeprefix("http://"), concurrency=4)


def test_health_server_and_model_metadata(server, demo_bundle: Path):
    url, _ = server
    assert _request(f"{url}/v2/health/live")[0] == 200
    assert _request(f"{url}/v2/health/ready")[0] == 200
    status, body, _ = _request(f"{url}/v2")
    assert status == 200 and "binary_tensor_data" in json.loads(body)["extensions"]
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    for path in (f"/v2/models/{manifest['name']}", f"/v2/models/{manifest['name']}/versions/1"):
        status, body, _ = _request(url + path)
        meta = json.loads(body)
        assert status == 200 and meta["name"] == manifest["name"] and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
        assert [o["name"] for o in meta["outputs"]] == [t["output"] for t in manifest["tasks"]]
        assert all(o["shape"][0] == -1 for o in meta["outputs"])
    assert _request(f"{url}/v2/models/{manifest['name']}/ready")[0] == 200
    assert _request(f"{url}/v2/models/{manifest['name']}/versions/1/ready")[0] == 200


def test_tritonclient_binary_outputs_equal_the_in_process_runtime(server, demo_bundle: Path):
    url, _ = server
    images = _images(3, seed=1)
    want = load(demo_bundle, threads=1)(images)
    tensor = http.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)  # binary by default
    result = _client(url).infer("demo", [tensor])
    for task, value in want.items():
        np.testing.assert_allclose(result.as_numpy(task), value, rtol=0, atol=1e-6)
    # Only the asked output comes back, computed by the pruned graph.
    subset = _client(url).infer("demo", [tensor], outputs=[http.InferRequestedOutput("depth")])
    assert [o["name"] for o in subset.get_response()["outputs"]] == ["depth"]
    np.testing.assert_allclose(subset.as_numpy("depth"), want["depth"], rtol=0, atol=1e-6)


def test_plain_json_request_and_response(server, demo_bundle: Path):
    url, _ = server
    images = _images(1, seed=2)
    body = json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                                   "data": images.ravel().tolist()}],
                       "outputs": [{"name": "seg"}, {"name": "normals"}]}).encode()
    status, raw, headers = _request(f"{url}/v2/models/demo/versions/1/infer", "POST", body,
                                    {"Content-Type": "application/json"})
    assert status == 200, raw
    response = json.loads(raw)
    assert response["model_name"] == "demo" and [o["name"] for o in response["outputs"]] == ["seg", "normals"]
    want = load(demo_bundle, threads=1)(images)
    for output in response["outputs"]:
        got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(got, want[output["name"]], rtol=0, atol=1e-6)


def _binary_body(images: np.ndarray, *, declared: int | None = None, extra: dict | None = None) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": declared if declared is not None else images.nbytes}}],
              **(extra or {})}
    text = json.dumps(header).encode()
    return text + images.tobytes(), {"Inference-Header-Content-Length": str(len(text))}


def _json_body(**fields) -> bytes:
    tensor = {"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * (3 * 64 * 64)}
    tensor.update(fields)
    return json.dumps({"inputs": [tensor]}).encode()


NAN = _images(1)
NAN[0, 0, 0, 0] = np.nan
BAD_REQUESTS = {
    "malformed JSON": (400, b"{not json", {}),
    "not an object": (400, b"[1, 2]", {}),
    "no inputs": (400, json.dumps({"outputs": []}).encode(), {}),
    "wrong input name": (400, _json_body(name="pixels"), {}),
    "wrong datatype": (400, _json_body(datatype="INT64", data=[0] * (3 * 64 * 64)), {}),
    "unknown datatype": (400, _json_body(datatype="FP128"), {}),
    "wrong rank": (400, _json_body(shape=[3, 64, 64]), {}),
    "wrong image size": (400, _json_body(shape=[1, 3, 32, 128]), {}),
    "data length vs shape": (400, _json_body(data=[0.0] * 10), {}),
    "data not numbers": (400, _json_body(data=["a"] * (3 * 64 * 64)), {}),
    "non-finite input": (400, *_binary_body(NAN)),
    "binary size over the body": (400, *_binary_body(_images(1), declared=_images(1).nbytes + 4)),
    "header length over the body": (400, _binary_body(_images(1))[0], {"Inference-Header-Content-Length": "99999999"}),
    "unknown output": (400, *_binary_body(_images(1), extra={"outputs": [{"name": "nope"}]})),
}


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    url, _ = server
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http_client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/v2/models/demo/infer")
    connection.putheader("Content-Length", str(MAX_BODY + 1))
    connection.endheaders()  # the body never comes: the declared length alone is refused
    response = connection.getresponse()
    assert response.status == 413 and "--max-body-bytes" in json.loads(response.read())["error"]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_one_line(server, case: str):
    url, _ = server
    status, body, headers = BAD_REQUESTS[case]
    got, raw, _ = _request(f"{url}/v2/models/demo/infer", "POST", body, headers)
    assert got == status, (case, raw)
    error = json.loads(raw)["error"]
    assert error and "\n" not in error


def test_a_non_finite_input_is_named_with_its_count_and_no_python_api_advice(server):
    url, _ = server
    images = _images(1)
    images[0, 1, 2, :3] = [np.nan, np.inf, -np.inf]
    got, raw, _ = _request(f"{url}/v2/models/demo/infer", "POST", *_binary_body(images))
    assert got == 400
    assert json.loads(raw)["error"] == "input 'image': holds 3 NaN/inf value(s)"


@pytest.mark.parametrize("path, method, status", [
    ("/v2/models/nope/infer", "POST", 404), ("/v2/models/demo/versions/2/infer", "POST", 404),
    ("/v2/models/nope", "GET", 404), ("/v2/models/demo/infer", "GET", 405), ("/v2/nothing", "GET", 404)])
def test_unknown_models_versions_and_routes(server, path: str, method: str, status: int):
    url, _ = server
    got, raw, _ = _request(url + path, method, b"{}" if method == "POST" else None)
    assert got == status and "\n" not in json.loads(raw)["error"]


@pytest.mark.slow
def test_32_concurrent_clients_each_get_their_own_answer_and_batches_form(server, demo_bundle: Path):
    url, log = server
    predictor = load(demo_bundle, threads=1)
    clients, per_client = 32, 50

    def client(index: int) -> int:
        wrong = 0
        connection = http.InferenceServerClient(url.removeprefix("http://"))
        for j in range(per_client):
            images = _images(1, seed=1000 * index + j)
            tensor = http.InferInput("image", [1, 3, 64, 64], "FP32")
            tensor.set_data_from_numpy(images)
            got = connection.infer("demo", [tensor], outputs=[http.InferRequestedOutput("depth")]).as_numpy("depth")
            wrong += not np.allclose(got, predictor(images, tasks=["depth"])["depth"], rtol=0, atol=1e-5)
        return wrong

    with ThreadPoolExecutor(clients) as pool:
        assert sum(pool.map(client, range(clients))) == 0
    status, text, _ = _request(f"{url}/metrics")
    metrics = text.decode()
    assert status == 200
    success = next(line for line in metrics.splitlines() if line.startswith("taskfold_request_success_total")
                   and 'model="demo"' in line)
    assert float(success.rsplit(" ", 1)[1]) >= clients * per_client
    # Dynamic batching merged some of the concurrent requests: fewer executions than requests.
    count = next(line for line in metrics.splitlines() if line.startswith("taskfold_batch_size_count")
                 and 'model="demo"' in line)
    assert float(count.rsplit(" ", 1)[1]) < clients * per_client
    assert '"POST /v2/models/demo/infer HTTP/1.1" 200' in log.read_text()  # the access log


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the demo model in a /metrics text."""
    want = [f'{key}="{value}"' for key, value in {"model": "demo", **labels}.items()]
    line = next(line for line in text.splitlines() if line.startswith(name + "{") and all(w in line for w in want))
    return float(line.rsplit(" ", 1)[1])


def test_a_lone_request_does_not_wait_out_the_queue_delay(server):
    """The server runs with --max-queue-delay-us 2000; one client sending one request at a time
    has nobody to wait for, so each batch starts because nothing else is arriving."""
    url, _ = server
    reasons = ("full", "none_arriving", "max_delay")

    def dispatches() -> dict[str, float]:
        text = _request(f"{url}/metrics")[1].decode()
        return {r: _metric(text, "taskfold_batch_dispatch_total", reason=r) for r in reasons}

    before = dispatches()
    client = _client(url)
    for seed in range(5):
        tensor = http.InferInput("image", [1, 3, 64, 64], "FP32")
        tensor.set_data_from_numpy(_images(1, seed=seed))
        client.infer("demo", [tensor])
    after = dispatches()
    assert {r: after[r] - before[r] for r in reasons} == {"full": 0, "none_arriving": 5, "max_delay": 0}


@pytest.mark.slow  # a served process drained by a real SIGTERM
def test_sigterm_drains_and_exits_0(demo_bundle: Path, tmp_path: Path):
    proc, url = _start(demo_bundle, tmp_path / "log")
    images = _images(32, seed=3)
    results = []
    thread = threading.Thread(target=lambda: results.append(
        _request(f"{url}/v2/models/demo/infer", "POST", *_binary_body(images))[0]))
    thread.start()
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    thread.join()
    assert results == [200]


def test_a_tampered_bundle_is_refused_at_start(demo_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    assert_user_error(run_cli("serve", str(copy), "--port", "0"), "sha256")


def test_export_triton_configs_parse_with_tritons_schema(demo_bundle: Path, tmp_path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    proc = run_cli("export-triton", str(demo_bundle), "-o", str(repo), "--max-batch", "16")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    config = text_format.Parse((repo / "demo" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "demo" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", model_config_pb2.TYPE_FP32, [3, 64, 64])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        (t["output"], list(t["shape"][1:])) for t in manifest["tasks"]]
    assert config.HasField("dynamic_batching") and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (repo / "demo" / "1" / "model.onnx").read_bytes() == (demo_bundle / "model.onnx").read_bytes()
    assert_user_error(run_cli("export-triton", str(demo_bundle), "-o", str(repo)), "already exists")
    assert run_cli("export-triton", str(demo_bundle), "-o", str(repo), "--overwrite").returncode == 0
