"""The field helper every config section uses, and the error that names a flag."""
from __future__ import annotations

from dataclasses import field

from megaflow.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the flag."""
    kind = "configuration error"


def _f(default=None, help="", flag=None, choices=None, action=None, **kw):
    """A config field: its default, CLI help, and (when not derived from the name) its flag."""
    meta = {"help": help, "flag": flag, "choices": choices, "action": action}
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta, **kw)
