"""The ``prism-vllm`` command line and HTTP extensions.

- ``prism-vllm serve``: vLLM's OpenAI-compatible server with Prism on by default
  (:mod:`prism_vllm.server.cli`), serving the bundled SmolLM2 model when no model is given
  (:mod:`prism_vllm.bundled`); the ``--prism-*`` flags it shares with ``inspect`` are in
  :mod:`prism_vllm.server.flags`.
- ``GET /prism/stats`` and ``prism_*`` Prometheus series: a ``vllm.endpoint_plugins`` plugin
  (:mod:`prism_vllm.server.http`) reading per-worker counters through ``collective_rpc``
  (:mod:`prism_vllm.server.worker`).
- ``prism-vllm inspect``: attention block maps with Prism's selection drawn over them
  (:mod:`prism_vllm.server.inspect_attention`: command line and drawing; the analysis is
  :mod:`prism_vllm.attention_maps`).

Importing this package imports neither torch nor vLLM.
"""
