"""Command-line flags for config settings, on any ``argparse`` parser.

Each component picks the sections/keys it cares about (the proxy wants ``proxy`` and
``master_server_address``, the master wants ``master`` and ``rpc``), gets ``--section-field``
flags (underscores accepted too: ``--rpc-max-frame-size`` == ``--rpc_max_frame_size``) with help
from the field metadata, and builds the config from parsed args. Flags default to
``argparse.SUPPRESS`` so only what was actually typed overrides the file and environment.

Values are converted at parse time, so a bad flag fails like any argparse error (usage + exit 2)
before anything starts. The auth secret has no flag: command lines are visible in ``ps``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transfer.config.errors import ConfigError
from transfer.config.loader import Layer, base_layers, build_config, flatten
from transfer.config.schema import (
    SECTIONS,
    MooncakeConfig,
    Setting,
    env_var_name,
    iter_settings,
    setting_of,
)
from transfer.config.sizes import format_size

__all__ = ["add_config_arguments", "config_from_args"]

# argparse ``dest`` names; the dot keeps them from clashing with the application's own options.
_DEST_PREFIX = "mooncake_config."
_CONFIG_FILE_DEST = "mooncake_config.file"


def _select(include: Iterable[str] | None) -> list[str]:
    """Dotted keys selected by section names, dotted keys or top-level keys (``None`` = all)."""
    every = [key for key, _ in iter_settings()]
    if include is None:
        return every
    sections = {section.name for section in SECTIONS}
    chosen: list[str] = []
    for name in include:
        if name in sections:
            matches = [key for key in every if key.startswith(name + ".")]
        elif name in every:
            matches = [name]
        else:
            raise ConfigError(
                "not a config section or key; choose from sections "
                f"{', '.join(sorted(sections))} or keys {', '.join(every)}",
                key=name,
            )
        chosen.extend(key for key in matches if key not in chosen)
    return chosen


def _describe_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    if value == "":
        return '""'
    return str(value)


def _help(key: str, spec: Setting, default: Any) -> str:
    shown = format_size(default) if spec.metavar == "SIZE" else _describe_default(default)
    text = f"{spec.help} (default: {shown}; env {env_var_name(key)})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _arg_type(spec: Setting) -> Any:
    def convert(text: str) -> Any:
        try:
            return spec.parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_config_arguments(
    parser: argparse.ArgumentParser,
    include: Iterable[str] | None = None,
    *,
    prefix: str = "",
    config_file_flag: bool = True,
) -> argparse._ArgumentGroup:
    """Add flags for the chosen settings to ``parser`` and return their argument group.

    ``include`` lists section names (``"rpc"``), dotted keys (``"master.port"``) and top-level
    Mooncake keys (``"protocol"``); ``None`` adds every setting. ``prefix`` (e.g.
    ``"mooncake-"``) is put before every flag name, for host parsers whose own flags would clash.
    With ``config_file_flag`` a ``--<prefix>config-file PATH`` flag is added that beats
    ``$MOONCAKE_CONFIG_PATH``.
    """
    defaults = MooncakeConfig()
    group = parser.add_argument_group(
        "Mooncake configuration",
        "Precedence: defaults < config file < environment variables < these flags.",
    )
    if config_file_flag:
        group.add_argument(
            *_flag_names(prefix + "config_file"),
            dest=_CONFIG_FILE_DEST,
            default=argparse.SUPPRESS,
            metavar="PATH",
            help="JSON or YAML config file, Mooncake's format (default: $MOONCAKE_CONFIG_PATH)",
        )
    fields = dict(iter_settings())
    for key in _select(include):
        spec = setting_of(fields[key])
        if not spec.cli:
            continue
        section, dot, name = key.partition(".")
        default = getattr(getattr(defaults, section), name) if dot else getattr(defaults, key)
        common: dict[str, Any] = {
            "dest": _DEST_PREFIX + key,
            "default": argparse.SUPPRESS,
            "help": _help(key, spec, default),
        }
        names = _flag_names(prefix + key.replace(".", "_"))
        if spec.flag:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(*names, type=_arg_type(spec), metavar=spec.metavar, **common)
    return group


def _flag_names(base: str) -> list[str]:
    dashed = "--" + base.replace("_", "-")
    underscored = "--" + base.replace("-", "_")
    return [dashed] if dashed == underscored else [dashed, underscored]


def config_from_args(
    args: argparse.Namespace,
    *,
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> MooncakeConfig:
    """Build the config from parsed ``args`` over the file and environment layers.

    Only flags given on the command line override; the file is ``path``, else the config-file
    flag, else ``$MOONCAKE_CONFIG_PATH``. ``env`` defaults to ``os.environ``.
    """
    given = vars(args)
    if path is None:
        path = given.get(_CONFIG_FILE_DEST)
    overrides = {
        dest[len(_DEST_PREFIX) :]: value
        for dest, value in given.items()
        if dest.startswith(_DEST_PREFIX) and dest != _CONFIG_FILE_DEST
    }
    layers: list[Layer] = base_layers(path, env)
    layers.append(flatten(overrides, "the command line"))
    return build_config(layers)
