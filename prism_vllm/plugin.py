"""vLLM general plugin: makes ``--attention-backend prism`` select Prism.

Entry point (pyproject): ``vllm.general_plugins: prism = prism_vllm.plugin:register``. vLLM
calls it once in every process it starts (API server, engine core, workers) before it parses
a backend name or builds a model.

What ``register()`` does, and nothing else to vLLM:

1. registers Prism as vLLM's CUSTOM backend by *string path*, so registering imports neither
   the backend module nor CUDA;
2. aliases the name ``PRISM`` to ``AttentionBackendEnum.CUSTOM`` in the enum's member map, so
   ``--attention-backend prism`` (any case), ``LLM(attention_backend="prism")`` and
   ``-ac '{"backend": "prism"}'`` resolve (vLLM upper-cases the name and looks it up there).
   The config then holds the real member CUSTOM, which pickles by value, so spawned processes
   that unpickle it before their own plugins load still get CUSTOM;
3. installs a torch (not vLLM) module-registration hook that remembers, for each vLLM
   ``Attention`` layer served by Prism, the module that owns it, so the backend can read that
   module's ``rotary_emb`` (rotary dim, NeoX/GPT-J layout, scaled frequencies) instead of
   guessing the RoPE layout from the model name.

``register()`` is idempotent.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional

__all__ = ["register", "BACKEND_CLASS_PATH", "ALIAS"]

logger = logging.getLogger(__name__)

#: Where vLLM finds the backend class (imported lazily by vLLM's registry).
BACKEND_CLASS_PATH = "prism_vllm.attention_backend.backend.PrismAttentionBackend"
#: The name users pass to --attention-backend (matched case-insensitively by vLLM).
ALIAS = "PRISM"

_hook_handle: Optional[Any] = None


def register() -> None:
    """Register the Prism backend with vLLM (idempotent; see the module docstring)."""
    from vllm.v1.attention.backends.registry import (
        _ATTN_OVERRIDES,
        AttentionBackendEnum,
        register_backend,
    )

    custom = AttentionBackendEnum.CUSTOM
    previous = _ATTN_OVERRIDES.get(custom)
    if previous is not None and previous != BACKEND_CLASS_PATH:
        logger.warning(
            "vLLM's CUSTOM attention backend was registered as %s; prism-vllm replaces it with %s "
            "(--attention-backend prism / custom now select Prism). Uninstall one of the two "
            "plugins or restrict them with VLLM_PLUGINS.",
            previous,
            BACKEND_CLASS_PATH,
        )
    register_backend(custom, BACKEND_CLASS_PATH)
    # An alias, not a new member: only the member map is consulted by name lookups, while
    # iteration, values and pickling keep seeing the 'CUSTOM' member.
    AttentionBackendEnum._member_map_.setdefault(ALIAS, custom)
    _install_rope_owner_hook()


def _install_rope_owner_hook() -> None:
    global _hook_handle
    if _hook_handle is not None:
        return
    from torch.nn.modules.module import register_module_module_registration_hook

    _hook_handle = register_module_module_registration_hook(_on_child_registered)


def _on_child_registered(module: Any, name: str, submodule: Any) -> None:
    """torch hook, called on every ``parent.name = child_module`` in the process.

    When the child is a vLLM attention layer whose impl is Prism's, hand the impl a weak
    reference to the parent (the model's attention module, which owns ``rotary_emb``). Kept
    cheap (two getattr on the common path) and never raises: it runs inside model code.
    """
    impl = getattr(submodule, "impl", None)
    if impl is None:
        return
    set_owner = getattr(impl, "prism_set_rope_owner", None)
    if set_owner is None:
        return
    try:
        set_owner(weakref.ref(module), name)
    except Exception:  # pragma: no cover - defensive: never break model construction
        logger.debug("prism: could not record the owner of attention layer %r", name, exc_info=True)
