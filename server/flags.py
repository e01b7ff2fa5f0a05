"""What ``prism-vllm serve`` and ``prism-vllm inspect`` share: the ``--prism-<field>`` flags
(one per :class:`prism_vllm.PrismConfig` field) and the one-line usage error.

Both commands import this module; neither imports the other's internals.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any, Optional

from prism_vllm.config import PrismConfig

__all__ = ["UsageError", "PRISM_FLAG_PREFIX", "prism_flag_names", "field_type", "parse_prism_value"]

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
    if typing.get_origin(want) is typing.Union and type(None) in args:
        return [a for a in args if a is not type(None)][0], True
    return want, False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_prism_value(flag: str, name: str, raw: Optional[str]) -> Any:
    """The value of ``--prism-<field> RAW`` typed like the field (``none`` for optional fields).

    Raises:
        UsageError: no value, or one that does not parse as the field's type.
    """
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
