"""prism-vllm: Prism spectral-aware block-sparse prefill attention for vLLM.

Importing this package is cheap (no torch/vLLM import); the vLLM plugin entry point is
``prism_vllm.plugin:register``.
"""

__version__ = "0.1.0"

from .config import PrismConfig  # noqa: E402  (stdlib only)

__all__ = ["PrismConfig", "__version__"]
