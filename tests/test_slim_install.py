"""The base install is the runtime alone: a fresh virtual environment with `pip install taskfold[serve]`
has no torch, and predict, bench, flops and a served inference work on a bundle; training says
which extra to install."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cli_runner import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[serve]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


def _taskfold(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "taskfold"), *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_the_base_install_has_no_torch_and_runs_bundles(slim_venv: Path, demo_bundle: Path, tmp_path: Path):
    python = str(slim_venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None, "
                                          "u.find_spec('timm') is None)"], capture_output=True, text=True)
    assert probe.stdout.split() == ["True", "True"]
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    assert _taskfold(slim_venv, "predict", str(demo_bundle), str(tmp_path / "x.npy")).returncode == 0
    with np.load(tmp_path / "x.out.npz") as out:
        assert set(out) == {"seg", "depth", "normals"} and out["seg"].shape == (2, 5, 64, 64)
    bench = _taskfold(slim_venv, "bench", str(demo_bundle), "--batch", "1", "--iters", "3", "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["results"][0]["batch"] == 1
    flops = _taskfold(slim_venv, "flops", str(demo_bundle), "--json")
    assert flops.returncode == 0 and json.loads(flops.stdout)["macs"] > 0
    train = _taskfold(slim_venv, "train", str(ROOT / "configs" / "demo.yaml"))
    assert train.returncode == 2 and "pip install 'taskfold[train]'" in train.stderr
    assert len(train.stderr.strip().splitlines()) == 1


def test_the_base_install_serves_a_bundle(slim_venv: Path, demo_bundle: Path, tmp_path: Path):
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(slim_venv / "bin" / "taskfold"), "serve", str(demo_bundle), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while " at http://" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        url = log.read_text().split(" at ", 1)[1].split("/v2/models")[0]
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                       "data": [0.0] * (3 * 64 * 64)}], "outputs": [{"name": "depth"}]}).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(urllib.request.Request(f"{url}/v2/models/demo/infer", data=body, method="POST"),
                         timeout=60) as response:
            answer = json.loads(response.read())
        assert [o["name"] for o in answer["outputs"]] == ["depth"] and answer["outputs"][0]["shape"] == [1, 1, 64, 64]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
