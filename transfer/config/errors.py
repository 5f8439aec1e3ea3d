"""The one exception every configuration mistake becomes.

Why one type: a component starting up should fail with a single message that a user can act on
without reading a traceback - which key (dotted path), what value, where it came from (file, env
var, flag) and what would have been accepted. Subclassing ``ValueError`` keeps ``except
ValueError`` callers working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError"]

_MISSING: Any = object()
_MAX_VALUE_REPR = 200
REDACTED = "<redacted>"


def _short_repr(value: Any) -> str:
    """``repr`` bounded in length: bad input can be arbitrarily large (a pasted file, say)."""
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


class ConfigError(ValueError):
    """An invalid configuration: bad value, unknown key, unreadable or malformed file.

    Attributes let callers (and tests) inspect the mistake without parsing the message:
    ``key`` is the dotted path (``"rpc.max_frame_size"``) or ``None`` for file-level problems,
    ``value`` the offending value (``"<redacted>"`` for secrets), ``source`` where it came from
    and ``allowed`` what would have been accepted.
    """

    def __init__(
        self,
        allowed: str,
        *,
        key: str | None = None,
        value: Any = _MISSING,
        source: str | None = None,
        secret: bool = False,
    ) -> None:
        self.key = key
        self.value = REDACTED if secret and value is not _MISSING else value
        self.allowed = allowed
        self.source = source
        self.secret = secret
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.key is not None:
            parts.append(f"config key {self.key!r}")
        if self.value is not _MISSING:
            shown = REDACTED if self.secret else _short_repr(self.value)
            parts.append(f"value {shown}")
        if self.source:
            parts.append(f"from {self.source}")
        head = ", ".join(parts)
        return f"{head}: {self.allowed}" if head else self.allowed

    @property
    def has_value(self) -> bool:
        """Whether the error is about one specific value (as opposed to, say, a missing file)."""
        return self.value is not _MISSING

    def with_source(self, source: str | None) -> ConfigError:
        """The same error, now saying where the value came from (the loader knows; a section
        validating its own fields does not)."""
        if source is None or self.source is not None:
            return self
        return ConfigError(
            self.allowed,
            key=self.key,
            value=self.value if self.has_value else _MISSING,
            source=source,
            secret=self.secret,
        )
