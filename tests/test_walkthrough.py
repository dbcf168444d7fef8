"""README "From install to a served adapter" runs as written: each line of its block, in order, in a fresh folder (the
install line is the Quickstart's, which CI runs; here the suite's environment stands for it). The `vllm serve` line
runs only where vLLM and a GPU are present."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.support import REPO

pytestmark = pytest.mark.recipe

README = (REPO / "README.md").read_text()
BLOCK = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
INSTALL, STEPS = BLOCK[0], BLOCK[1:]
SERVE = next(line for line in STEPS if line.startswith("vllm serve"))
NOISE = ("Setting accelerator to CPU", "FutureWarning", "DeprecationWarning", "Traceback")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DS_ACCELERATOR")}
    # The suite's environment stands for the install line: its python, accelerate and sora-ds come first on PATH.
    return {**env, "PATH": f"{Path(sys.executable).absolute().parent}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(REPO)}


def _run(line: str, cwd: Path) -> str:
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_install_line_is_the_quickstarts():
    main = re.search(r"<!-- quickstart:main -->\n```bash\n(.*?)\n```", README, flags=re.S).group(1)
    assert main == f"{INSTALL} && accelerate launch recipes/llama_sora.py"


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every line but the install and `vllm serve`, as written, in a folder holding only the repo's recipes/."""
    cwd = tmp_path_factory.mktemp("walkthrough")
    (cwd / "recipes").symlink_to(REPO / "recipes")
    outputs = {line: _run(line, cwd) for line in STEPS if line != SERVE}
    return cwd, outputs


def test_walkthrough_runs_as_written(walked):
    cwd, outputs = walked
    for line, output in outputs.items():
        for noise in NOISE:
            assert noise not in output, (line, noise)
    summary = json.loads((cwd / "outputs" / "llama_sora" / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["kept_fraction"] < 1
    assert "trained tokens" in outputs[STEPS[0]]
    # The reply the README promises, from the exported vLLM-format files loaded by PEFT on their base.
    generate = next(line for line in STEPS if line.startswith("sora-ds generate"))
    promised = re.search(r'#.*"(.+)"', generate).group(1)
    assert outputs[generate].strip() == promised


def test_serve_line_uses_the_rank_that_export_reports(walked):
    cwd, _ = walked
    record = json.loads((cwd / "adapter_vllm" / "serving.json").read_text())
    assert int(re.search(r"--max-lora-rank (\d+)", SERVE).group(1)) == record["vllm_max_lora_rank"]
    assert record["engines"]["vllm"].startswith("loads")


@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("vllm") is None, reason="needs a GPU and vLLM")
def test_vllm_serves_the_adapter(walked):
    cwd, _ = walked
    server = subprocess.Popen(["bash", "-c", SERVE.split("#")[0]], cwd=cwd, env=_env())
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen("http://localhost:8000/v1/models", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "vllm serve did not come up"
                time.sleep(5)
        body = json.dumps({"model": "sora", "messages": [{"role": "user", "content": "repeat: owl"}],
                           "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request("http://localhost:8000/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["message"]["content"].strip() == "owl owl"
    finally:
        server.terminate()
        server.wait(timeout=60)
