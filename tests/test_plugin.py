"""The vLLM plugin: entry point, CUSTOM registration, the 'prism' alias, pickling, the RoPE hook.

The registry checks run in a fresh Python process, because vLLM loads general plugins once per
process and the alias must be shown to come from the entry point, not from this test session.
"""

import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

pytest.importorskip("vllm")

_FRESH = textwrap.dedent(
    r"""
    import json, pickle
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E, _ATTN_OVERRIDES
    from vllm.config.attention import AttentionConfig

    out = {}
    members_before = list(E)
    # Before the plugin: the name is unknown, and CUSTOM already round-trips through pickle
    # (what spawned engine/worker processes do before their own plugins load).
    try:
        AttentionConfig(backend="prism")
        out["before"] = "accepted"
    except Exception as e:
        out["before"] = type(e).__name__ + ": " + str(e)[:300]
    out["custom_pickles_without_plugin"] = pickle.loads(pickle.dumps(E.CUSTOM)) is E.CUSTOM

    from vllm.plugins import load_general_plugins
    load_general_plugins()
    from prism_vllm import plugin

    out["path"] = E.CUSTOM.get_path()
    out["backend"] = [AttentionConfig(backend=n).backend.name for n in ("prism", "Prism", "PRISM", "custom")]
    out["ac_json"] = AttentionConfig(**json.loads('{"backend": "prism"}')).backend.name
    out["validate_before"] = AttentionConfig.validate_backend_before("pRiSm").name
    out["alias_is_custom"] = E["PRISM"] is E.CUSTOM
    out["pickles"] = pickle.loads(pickle.dumps(AttentionConfig(backend="prism").backend)) is E.CUSTOM
    out["members_unchanged"] = list(E) == members_before and "PRISM" not in E._member_names_
    try:
        AttentionConfig(backend="prism2")
        out["unknown"] = "accepted"
    except ValueError as e:
        out["unknown"] = str(e)[:300]
    hook = plugin._hook_handle
    plugin.register(); plugin.register()
    out["idempotent"] = (
        plugin._hook_handle is hook and _ATTN_OVERRIDES[E.CUSTOM] == plugin.BACKEND_CLASS_PATH
        and E["PRISM"] is E.CUSTOM
    )
    cls = E.CUSTOM.get_class()
    out["class"] = cls.__module__ + "." + cls.__qualname__
    out["name_roundtrip"] = E[cls.get_name()] is E.CUSTOM
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    # outside the checkout: `python -c` puts its working directory first on sys.path, and the
    # checkout's kernels/ folder would shadow the `kernels` package transformers imports
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path_factory.mktemp("fresh"),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_name_unknown_before_the_plugin_loads(fresh_process):
    assert "Unknown attention backend: 'PRISM'" in fresh_process["before"]
    assert fresh_process["custom_pickles_without_plugin"] is True


def test_entry_point_registers_custom_by_path(fresh_process):
    assert fresh_process["path"] == "prism_vllm.attention_backend.backend.PrismAttentionBackend"
    assert fresh_process["class"] == fresh_process["path"]
    assert fresh_process["name_roundtrip"] is True


def test_prism_alias_any_case_and_json(fresh_process):
    assert fresh_process["backend"] == ["CUSTOM"] * 4
    assert fresh_process["ac_json"] == "CUSTOM"
    assert fresh_process["validate_before"] == "CUSTOM"
    assert fresh_process["alias_is_custom"] is True
    assert "Unknown attention backend" in fresh_process["unknown"]


def test_alias_is_not_a_new_member_and_pickles(fresh_process):
    assert fresh_process["members_unchanged"] is True
    assert fresh_process["pickles"] is True


def test_register_is_idempotent(fresh_process):
    assert fresh_process["idempotent"] is True


class _FakeImpl:
    def __init__(self):
        self.owners = []

    def prism_set_rope_owner(self, owner, name):
        self.owners.append((owner, name))


class _FakeAttention(torch.nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.impl = impl


def test_hook_hands_the_owner_to_prism_impls_only():
    from prism_vllm import plugin

    plugin.register()
    impl = _FakeImpl()

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary_emb = torch.nn.Identity()
            self.attn = _FakeAttention(impl)
            self.other = torch.nn.Linear(2, 2)  # no impl: ignored

    owner = Owner()
    assert len(impl.owners) == 1
    ref, name = impl.owners[0]
    assert isinstance(ref, weakref.ReferenceType) and ref() is owner and name == "attn"
    del owner
    assert ref() is None  # a weak reference: the hook keeps no model alive
