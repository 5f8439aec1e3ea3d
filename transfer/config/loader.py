"""Loading: defaults < JSON/YAML file < environment variables < overrides (CLI flags), later wins.

The file is Mooncake's own format (a flat JSON object of Mooncake keys, as vLLM's
``MooncakeStoreConnector`` and Mooncake's ``mooncake_config.py`` read it) extended with nested
sections for our settings; YAML is accepted too. Its path comes from the ``path`` argument or
``$MOONCAKE_CONFIG_PATH``, as in Mooncake.

Keys that other Mooncake consumers (vLLM, SGLang, Mooncake's wheel) put in the same file but that
this implementation has no use for are accepted with one log line each, so users can point us at
their existing file unchanged. Any other unknown key is a :class:`ConfigError` listing the known
ones: a typo in a config file must not silently fall back to a default.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from transfer.config.errors import ConfigError
from transfer.config.schema import (
    SECTIONS,
    MooncakeConfig,
    build_section,
    env_var_name,
    iter_settings,
    section_class,
)

__all__ = [
    "CONFIG_PATH_ENV",
    "IGNORED_MOONCAKE_KEYS",
    "MAX_CONFIG_FILE_BYTES",
    "load_config",
    "read_config_file",
]

logger = logging.getLogger(__name__)

CONFIG_PATH_ENV = "MOONCAKE_CONFIG_PATH"
# A config file is a few hundred bytes; refuse to read anything that is clearly not one.
MAX_CONFIG_FILE_BYTES = 1 << 20

# Mooncake-ecosystem keys we accept and ignore: key -> who writes it and why we do not need it.
IGNORED_MOONCAKE_KEYS: Mapping[str, str] = {
    "mode": "vLLM MooncakeStoreConfig topology (embedded/standalone-store)",
    "tenant_id": "Mooncake/vLLM store tenant label; our tenants are store.tenant_id with "
                 "store.tenant_secret, proven to the master (docs/security.md)",
    "enable_offload": "vLLM MooncakeStoreConfig SSD tier; here master.enable_ssd_offload and a "
                      "store node's --ssd-dir/--ssd-size decide",
    "enable_ssd_offload": "Mooncake client SSD offload; here master.enable_ssd_offload and a "
                          "store node's --ssd-dir/--ssd-size decide",
    "ssd_offload_path": "Mooncake client SSD offload; here a store node's --ssd-dir",
    "metadata_backend": "legacy vLLM MooncakeConnector; the backend follows from metadata_server",
    "localhost_name": "legacy vLLM MooncakeConnector spelling; use local_hostname",
    "prefill_url": "legacy vLLM MooncakeConnector (v0 disaggregation)",
    "decode_url": "legacy vLLM MooncakeConnector (v0 disaggregation)",
    "master_metrics_port": "SGLang HiCache client setting; the master's own is master.metrics_port",
    "check_server": "SGLang HiCache client setting",
    "standalone_storage": "SGLang HiCache client setting",
    "client_server_address": "SGLang HiCache client setting",
    "extra_backend_tag": "SGLang HiCache client setting",
}

# (value, where it came from) per dotted key; one dict per precedence layer.
Layer = dict[str, tuple[Any, str]]


# Flow collections ("[", "{") open at once; real configs nest two or three deep.
MAX_YAML_FLOW_DEPTH = 64


class _StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (never arbitrary objects) that also rejects duplicate keys, which
    plain YAML silently resolves to the last one, and flow collections nested deeper than
    :data:`MAX_YAML_FLOW_DEPTH`: PyYAML's scanner keeps a possible simple key per open ``[``
    and rescans them all for every token, so a 5 KB line of ``[`` took it over a second before
    the composer's RecursionError refused it (found by the config fuzz target)."""

    def fetch_flow_collection_start(self, TokenClass: type[yaml.Token]) -> None:
        if self.flow_level >= MAX_YAML_FLOW_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_YAML_FLOW_DEPTH} levels", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)


def _construct_mapping(loader: _StrictYamlLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: let construct_mapping report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON or YAML config file into a mapping; every failure is one :class:`ConfigError`
    with the path (and line:column where the parser gives one).

    Format: ``.json`` is JSON, ``.yaml``/``.yml`` is YAML, anything else is JSON when it starts
    with ``{`` (Mooncake's files) and YAML otherwise. An empty YAML file is an empty config.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO would block forever; a directory has no content.
            raise ConfigError(f"config file {name} is not a regular file")
        if st.st_size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(
                f"config file {name} is {st.st_size} bytes; the limit is {MAX_CONFIG_FILE_BYTES}"
            )
        with open(name, "rb") as fh:
            data = fh.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:  # grew between stat and read
        raise ConfigError(f"config file {name} is over the {MAX_CONFIG_FILE_BYTES}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None

    lowered = name.lower()
    as_json = lowered.endswith(".json") or (
        not lowered.endswith((".yaml", ".yml")) and text.lstrip().startswith("{")
    )
    parsed: Any
    if as_json:
        try:
            parsed = json.loads(text, object_pairs_hook=_reject_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{name}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}"
            ) from None
        except ValueError as exc:  # duplicate key, or a number too large to parse
            raise ConfigError(f"{name}: malformed JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{name}: malformed JSON: nested too deeply") from None
    else:
        try:
            parsed = yaml.load(text, Loader=_StrictYamlLoader)  # SafeLoader subclass: no objects
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            problem = exc.problem or exc.context or "parse error"
            raise ConfigError(f"{where}: malformed YAML: {problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: malformed YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{name}: malformed YAML: nested too deeply") from None
        if parsed is None:
            parsed = {}
    if not isinstance(parsed, dict):
        raise ConfigError(
            f"config file {name} must hold a mapping of keys to values, "
            f"not a {type(parsed).__name__}"
        )
    return parsed


def _top_level_keys() -> list[str]:
    return [key for key, _ in iter_settings() if "." not in key]


def _unknown_key(key: str, known: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown key; {hint}known keys: {', '.join(known)}", key=key, source=source)


def flatten(values: Mapping[Any, Any], source: str) -> Layer:
    """Turn a file/override mapping (nested sections and/or dotted keys) into a :data:`Layer`,
    rejecting unknown keys and logging ignored Mooncake ones."""
    top = _top_level_keys()
    every = top + [section.name for section in SECTIONS]
    layer: Layer = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"keys must be strings, got {type(key).__name__}", key=repr(key), source=source
            )
        section_name, dot, field_name = key.partition(".")
        cls = section_class(section_name)
        if key in top:
            layer[key] = (value, source)
        elif dot and cls is not None:
            known = [
                name.partition(".")[2]
                for name, _ in iter_settings()
                if name.startswith(section_name + ".")
            ]
            if field_name not in known:
                raise _unknown_key(key, [f"{section_name}.{name}" for name in known], source)
            layer[key] = (value, source)
        elif cls is not None:
            if value is None:  # "rpc:" with nothing under it in YAML
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"expected a mapping of {section_name} settings",
                    key=key,
                    value=value,
                    source=source,
                )
            for sub_key, sub_value in value.items():
                layer.update(flatten({f"{section_name}.{sub_key}": sub_value}, source))
        elif key in IGNORED_MOONCAKE_KEYS:
            logger.info(
                "ignoring Mooncake config key %r from %s (%s)",
                key,
                source,
                IGNORED_MOONCAKE_KEYS[key],
            )
        else:
            raise _unknown_key(key, every, source)
    return layer


def _env_layer(env: Mapping[str, str]) -> Layer:
    """Values from environment variables (Mooncake's names for Mooncake's keys, otherwise
    ``MOONCAKE_<SECTION>_<FIELD>``)."""
    layer: Layer = {}
    known_names = set()
    for key, _ in iter_settings():
        name = env_var_name(key)
        known_names.add(name)
        if name in env:
            layer[key] = (env[name], f"environment variable {name}")
    # Other tools share the MOONCAKE_ prefix (SGLang, Mooncake's wheel), so an unknown variable
    # is only a warning, and only under our section prefixes where it is most likely a typo.
    prefixes = tuple(f"MOONCAKE_{section.name.upper()}_" for section in SECTIONS)
    for name in env:
        if name.startswith(prefixes) and name not in known_names:
            logger.warning("ignoring unknown environment variable %s (not a config setting)", name)
    return layer


def build_config(layers: Sequence[Layer]) -> MooncakeConfig:
    """Merge layers (later wins) and build the validated config; errors name the value's source."""
    merged: Layer = {}
    for layer in layers:
        merged.update(layer)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {section.name: {} for section in SECTIONS}
    for key, (value, _) in merged.items():
        section_name, dot, field_name = key.partition(".")
        if dot:
            sections[section_name][field_name] = value
        else:
            top[key] = value
    try:
        built: dict[str, Any] = {
            section.name: build_section(section, sections[section.name]) for section in SECTIONS
        }
        return MooncakeConfig(**top, **built)
    except ConfigError as exc:
        source = merged[exc.key][1] if exc.key in merged else None
        raise exc.with_source(source) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MooncakeConfig:
    """Build the configuration from defaults < file < environment < ``overrides``.

    ``path`` defaults to ``$MOONCAKE_CONFIG_PATH`` (no file when neither is set); ``env`` defaults
    to ``os.environ`` - pass a dict to isolate tests or subprocess setups. ``overrides`` takes
    nested sections or dotted keys (``{"rpc.max_frame_size": "1MB"}``) and is what CLI flags
    become. Raises :class:`ConfigError` for any mistake, naming key, value and source.
    """
    layers = base_layers(path, env)
    if overrides:
        layers.append(flatten(overrides, "overrides"))
    return build_config(layers)


def base_layers(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None) -> list[Layer]:
    """The file and environment layers, resolving ``path``/``env`` defaults as
    :func:`load_config` documents (shared with the CLI helper, which adds its own layer)."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_PATH_ENV) or None
    layers: list[Layer] = []
    if path is not None:
        layers.append(flatten(read_config_file(path), f"config file {os.fspath(path)}"))
    layers.append(_env_layer(env))
    return layers
