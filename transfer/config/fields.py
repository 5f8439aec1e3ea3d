"""How one setting is declared: a dataclass field carrying its parser, help, env var and flags.

Why field metadata: adding a setting is one line (default, converter, help) and the loader, the
env-var mapping, the CLI flags and ``to_dict`` all pick it up. :class:`Section` is the base of the
named sections in :mod:`transfer.config.schema`; it validates itself in ``__post_init__`` so no
invalid section object can exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar

from transfer.config.errors import REDACTED, ConfigError
from transfer.config.sizes import format_size
from transfer.config.values import Converter, to_float, to_host, to_port, to_size

__all__ = ["DEFAULT_BIND_HOST", "Section", "Setting", "setting"]

DEFAULT_BIND_HOST = "127.0.0.1"
_ONE_HOUR = 3600.0

_SETTING = "mooncake.setting"


@dataclass(frozen=True)
class Setting:
    """What the loader, env mapping and CLI need to know about one field."""

    help: str
    parse: Converter
    metavar: str = "VALUE"
    env: str | None = None  # Mooncake's own variable name; default is MOONCAKE_<SECTION>_<FIELD>
    secret: bool = False  # never printed: repr, to_dict, logs and errors show "<redacted>"
    cli: bool = True  # secrets stay off the command line (visible in ps / shell history)
    flag: bool = False  # a boolean switch: --x / --no-x on the command line


def setting(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying a :class:`Setting` (the typing lie is dataclasses' own)."""
    return field(default=default, metadata={_SETTING: Setting(**kwargs)})


def _host(help: str) -> Any:
    return setting(DEFAULT_BIND_HOST, help=help, parse=to_host, metavar="HOST")


def _bind_port(default: int, help: str) -> Any:
    return setting(
        default,
        help=help + "; 0 = any free port",
        parse=partial(to_port, allow_zero=True),
        metavar="PORT",
    )


def _size(default: int, lo: int, hi: int, help: str, env: str | None = None) -> Any:
    return setting(
        default,
        help=f"{help} [{format_size(lo)}..{format_size(hi)}]",
        parse=partial(to_size, lo=lo, hi=hi),
        metavar="SIZE",
        env=env,
    )


def _timeout(default: float, help: str) -> Any:
    return setting(
        default,
        help=help + ", in seconds",
        parse=partial(to_float, lo=0.0, hi=_ONE_HOUR),
        metavar="SECONDS",
    )


def _setting_of(f: dataclasses.Field[Any]) -> Setting | None:
    return f.metadata.get(_SETTING)


def _validate_fields(obj: Any, prefix: str) -> None:
    """Convert every setting field of ``obj`` in place, or raise one ConfigError naming the key."""
    for f in dataclasses.fields(obj):
        spec = _setting_of(f)
        if spec is None:
            continue
        raw = getattr(obj, f.name)
        try:
            value = spec.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                str(exc), key=prefix + f.name, value=raw, secret=spec.secret
            ) from None
        object.__setattr__(obj, f.name, value)


_S = TypeVar("_S", bound="Section")


@dataclass(frozen=True)
class Section:
    """Base of the nested sections; ``name`` is the key in the file and the env/flag prefix."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _validate_fields(self, f"{self.name}.")

    def replace(self: _S, **changes: Any) -> _S:
        """A validated copy with ``changes`` applied (values are converted like file values)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`~transfer.config.load_config` reads back to an equal section."""
        return {
            f.name: _plain(getattr(self, f.name), _setting_of(f)) for f in dataclasses.fields(self)
        }



def _plain(value: Any, spec: Setting | None) -> Any:
    if spec is not None and spec.secret:
        return None if value is None else REDACTED
    if isinstance(value, tuple):
        return list(value)
    return value
