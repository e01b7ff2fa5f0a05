"""Shared pieces of the end-to-end benchmarks: run metadata, JSON, job subprocesses, tokenizers,
model configurations (YaRN overrides, the Llama-3.1-8B architecture, the dry-run model).

Imports no torch, transformers or vLLM at module level: the orchestrator stays light and every
GPU job runs in its own subprocess (fresh engine, GPU memory freed when it exits).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KB = 1024

#: SmolLM2-135M-Instruct's pre-training context; lengths above it run with YaRN.
SMOLLM2_NATIVE_LEN = 8192

#: Llama-3.1-8B's public config.json (architecture only; weights are vLLM's dummy init).
LLAMA_31_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def tok_label(n: int) -> str:
    """8192 -> '8K'."""
    return f"{n // KB}K" if n % KB == 0 else str(n)


def log(msg: str) -> None:
    """Progress line (the orchestrator echoes lines starting with '[bench]')."""
    # one write per line: threads (parallel jobs) must not interleave inside a line
    sys.stdout.write(f"[bench] {time.strftime('%H:%M:%S')} {msg}\n")
    sys.stdout.flush()


# -- run metadata --------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD of the repo (+'-dirty'), or PRISM_BENCH_COMMIT, or 'unknown' (no .git on the GPU machine)."""
    env = os.environ.get("PRISM_BENCH_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name() -> str:
    """Name of GPU 0 from nvidia-smi (no CUDA context in the orchestrator), else 'cpu'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # no nvidia-smi: ask torch in a child, so this process keeps no CUDA context
        probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("vllm", "torch", "triton", "transformers", "prism-vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_meta(command: Sequence[str], commit: str | None, dry_run: bool) -> dict[str, Any]:
    return {
        "gpu": "cpu (dry run)" if dry_run else gpu_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit or git_commit(),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in command),
        "dry_run": dry_run,
        "versions": versions(),
    }


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# -- jobs in subprocesses -------------------------------------------------------------------
def run_job_subprocess(job: dict[str, Any], job_dir: Path, timeout_s: float, verbose: bool = False) -> dict[str, Any]:
    """Run ``python -m benchmarks.worker JOB.json`` with a hard wall-clock limit.

    The child writes its result JSON after every finished unit of work, so a child killed at the
    limit still returns what it finished. Its whole process group (vLLM's engine core included)
    is terminated at the limit. Child output goes to ``job_dir/<name>.log``; lines starting with
    '[bench]' (all lines with ``verbose``) are echoed, and the log's tail on failure.

    Returns the child's result dict plus ``status`` ('ok', 'timeout', 'failed (rc=N)') and
    ``wall_s``.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    name = job["name"]
    job_file = job_dir / f"{name}.job.json"
    result_file = job_dir / f"{name}.result.json"
    log_file = job_dir / f"{name}.log"
    if result_file.exists():
        result_file.unlink()
    job = dict(job, result_file=str(result_file))
    write_json(job_file, job)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    log(f"job {name}: start (limit {timeout_s:.0f} s, log {log_file})")
    with open(log_file, "w") as lf:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", str(job_file)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lf.write(line)
                lf.flush()
                if verbose or line.startswith("[bench]"):
                    sys.stdout.write(f"  {name}: " + line)
                    sys.stdout.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (rc={rc})"
        except subprocess.TimeoutExpired:
            status = "timeout"
        _kill_group(proc)  # also after a normal exit: orphaned engine processes hold GPU memory
        th.join(timeout=10)
    wall = time.monotonic() - t0
    if status != "ok":
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        log(f"job {name}: {status} after {wall:.0f} s; log tail:")
        print("\n".join(f"    {name} | " + line[:300] for line in tail), flush=True)
    else:
        log(f"job {name}: done in {wall:.0f} s")
    res = read_json(result_file) if result_file.exists() else {}
    # The job and result files hold token ids and per-token log-probabilities (megabytes);
    # the orchestrator keeps what it needs, the log stays.
    for f in (job_file, result_file):
        if f.exists():
            f.unlink()
    res["status"] = status
    res["wall_s"] = round(wall, 1)
    res["log"] = str(log_file)
    return res


class GpuLock:
    """Lets jobs that share one GPU time something alone: a reader-writer lock over files.

    Work that may share the GPU (engine start, perplexity, generation) runs under ``shared()``;
    a timed section runs under ``exclusive()``, which waits until no other job holds the shared
    lock, and starts no new shared section meanwhile. Timers go first: while any job is waiting
    to time (it holds ``PATH.pending`` shared), a job about to start its shared work waits on
    ``PATH.pending`` exclusively, so timings never queue behind a whole engine start of a job
    that began later. A job holds the shared lock through all of its shared work and releases
    it only to time or to end, so no cycle of waits can form. The kernel drops a dead process's
    locks (a job killed at its time limit blocks nobody).
    """

    def __init__(self, path: str | os.PathLike[str]):
        import fcntl

        self._fcntl = fcntl
        self.path = Path(path)
        self._main = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._pending = os.open(str(self.path) + ".pending", os.O_RDWR | os.O_CREAT, 0o644)
        self.mode: str | None = None

    def shared(self) -> None:
        if self.mode == "shared":
            return
        self.release()
        f = self._fcntl
        f.flock(self._pending, f.LOCK_EX)  # no timer waiting
        f.flock(self._pending, f.LOCK_UN)
        f.flock(self._main, f.LOCK_SH)
        self.mode = "shared"

    def exclusive(self) -> None:
        if self.mode == "exclusive":
            return
        self.release()
        f = self._fcntl
        f.flock(self._pending, f.LOCK_SH)  # announce: new shared work waits
        f.flock(self._main, f.LOCK_EX)
        self.mode = "exclusive"

    def release(self) -> None:
        f = self._fcntl
        f.flock(self._main, f.LOCK_UN)
        f.flock(self._pending, f.LOCK_UN)
        self.mode = None

    def close(self) -> None:
        self.release()
        os.close(self._main)
        os.close(self._pending)


def _kill_group(proc: subprocess.Popen) -> None:
    """End every process left in the child's process group (its own session): SIGTERM, then
    SIGKILL after 15 s. Returns when the group is gone (or after the SIGKILL grace)."""

    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        if not alive():
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        t_end = time.monotonic() + wait
        while time.monotonic() < t_end:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            if not alive():
                break
            time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(timeout=5)


# -- tokenizers -----------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): the dry run's tokenizer, no files needed."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same two methods (no special tokens added)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# -- model configurations -----------------------------------------------------------------------
def read_rope_theta(model_dir: str) -> float:
    """rope_theta of a HF model folder (top level or inside rope_parameters / rope_scaling)."""
    cfg = read_json(Path(model_dir) / "config.json")
    for key in ("rope_parameters", "rope_scaling"):
        rp = cfg.get(key) or {}
        if isinstance(rp, dict) and "rope_theta" in rp:
            return float(rp["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def kv_bytes_per_token(model_dir: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes of vLLM's KV cache per token for a HF model folder: keys and values of every layer
    (2 bytes per element, 1 on an fp8 cache)."""
    cfg = read_json(Path(model_dir) / "config.json")
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    elem = 1 if kv_cache_dtype.startswith("fp8") else 2
    return 2 * int(cfg["num_hidden_layers"]) * kv_heads * head_dim * elem


def yarn_factor(max_len: int, native: int = SMOLLM2_NATIVE_LEN) -> float:
    """YaRN factor that stretches ``native`` to ``max_len`` (1.0: no scaling needed)."""
    return max(1.0, max_len / native)


def yarn_overrides(model_dir: str, max_len: int, native: int = SMOLLM2_NATIVE_LEN) -> dict[str, Any] | None:
    """``hf_overrides`` for vLLM 0.26 (transformers 5 keys: ``rope_parameters`` carries
    rope_type/rope_theta/factor/original_max_position_embeddings) that serve ``max_len`` tokens
    with YaRN; None when ``max_len`` fits the native context. vLLM derives the allowed length as
    original_max_position_embeddings * factor."""
    f = yarn_factor(max_len, native)
    if f <= 1.0:
        return None
    return {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": read_rope_theta(model_dir),
            "factor": f,
            "original_max_position_embeddings": native,
        },
        "max_position_embeddings": int(native * f),
    }


def write_llama8b_dir(dest: Path) -> Path:
    """A folder with Llama-3.1-8B's config.json only (vLLM's load_format='dummy' needs no weights)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "config.json", LLAMA_31_8B_CONFIG)
    return dest


def write_tiny_llama(dest: Path, vocab_size: int = 256, seed: int = 0, max_pos: int = 8192) -> Path:
    """A tiny random-weight Llama (2 layers, 4 q / 2 kv heads, head dim 16) for the dry run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_pos,
                      rope_theta=10000.0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(dest)
    return dest
