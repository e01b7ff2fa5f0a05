"""What ``prism-vllm serve`` and ``prism-vllm inspect`` share: the ``--prism-<field>`` flags
(one per :class:`prism_vllm.PrismConfig` field), the check of a model argument, and the
one-line usage error.

Both commands import this module; neither imports the other's internals.
"""

from __future__ import annotations

import os
import typing
from dataclasses import fields
from typing import Any, Optional

from prism_vllm.config import PrismConfig

__all__ = [
    "UsageError",
    "PRISM_FLAG_PREFIX",
    "prism_flag_names",
    "field_type",
    "flag_note",
    "parse_prism_value",
    "check_model_folder",
]

PRISM_FLAG_PREFIX = "--prism-"


class UsageError(Exception):
    """A command-line mistake: printed as ``prism-vllm COMMAND: error: ...``, exit status 2."""


def prism_flag_names() -> dict[str, str]:
    """``--prism-<field>`` flag -> PrismConfig field name."""
    return {PRISM_FLAG_PREFIX + f.name.replace("_", "-"): f.name for f in fields(PrismConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a PrismConfig field."""
    want = typing.get_type_hints(PrismConfig)[name]
    args = typing.get_args(want)
    if typing.get_origin(want) is typing.Union:  # Optional[X], or int | str (a count or "auto")
        return [a for a in args if a is not type(None)][0], type(None) in args
    return want, False


def flag_note(name: str) -> str:
    """What the ``--prism-<field>`` help adds to the field's docstring ('' for most fields)."""
    return ""  # the field docstrings say it all today (block_size: "Not tunable: only 128 ...")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_prism_value(flag: str, name: str, raw: Optional[str]) -> Any:
    """The value of ``--prism-<field> RAW`` typed like the field (``none`` for optional fields).

    Raises:
        UsageError: no value, or one that does not parse as the field's type.
    """
    want = typing.get_type_hints(PrismConfig)[name]
    if typing.get_origin(want) is typing.Union and set(typing.get_args(want)) == {int, str}:
        if raw is None:  # min_context_len: a token count or "auto"
            raise UsageError(f"{flag} needs a value (an integer, or auto)")
        try:
            return int(raw)
        except ValueError:
            return raw.strip()  # PrismConfig names the words it takes
    base, optional = field_type(name)
    if raw is None:
        raise UsageError(f"{flag} needs a value ({base.__name__})")
    low = raw.strip().lower()
    if optional and low in ("none", "null", "auto"):
        return None
    try:
        if base is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        pass
    else:
        return raw
    hint = "true or false" if base is bool else base.__name__
    raise UsageError(f"{flag}={raw!r} is not a valid {hint}" + (" (or none)" if optional else ""))


def looks_like_local_path(model: str) -> bool:
    """Whether a model argument can only name a local folder, never a model hub id.

    Hub ids are ``NAME`` or ``ORG/NAME`` and start with a letter, digit or underscore, so an
    argument that starts with ``/``, ``~`` or ``.`` (``./m``, ``../m``), or holds more than one
    ``/``, is a path. ``meta-llama/Llama-3.1-8B`` is not (vLLM downloads it when no such folder
    exists here).
    """
    return model.startswith(("/", "~", ".")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def check_model_folder(model: str, what: str = "model folder") -> None:
    """Raise a one-line UsageError when ``model`` is a local path that does not exist.

    Raises:
        UsageError: ``model`` looks like a local path (:func:`looks_like_local_path`) and no
            folder is there.
    """
    if looks_like_local_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise UsageError(
            f"{what} {model} does not exist (give an existing folder, or a model hub id such as "
            "Qwen/Qwen2.5-7B-Instruct)"
        )
