"""Where settings come from, as nested dicts for config.load_settings to merge and validate: a YAML
file, BINCOUNT_* environment variables (`__` between levels) and --set KEY=VALUE pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bincount.errors import BincountError

ENV_PREFIX = "BINCOUNT_"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: dict[str, Any], name: Any = lambda key: key) -> dict[str, Any]:
    """{"train.epochs": 3} -> {"train": {"epochs": 3}}; None values (flags not given) are dropped.

    A key that is both a value and a section (`train=3` and `train.epochs=3`) is a BincountError;
    `name(key)` says where a key came from (`--set train`, `BINCOUNT_TRAIN`).
    """
    out: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}  # who set each value or section

    def conflict(key: str, path: tuple[str, ...]) -> BincountError:
        return BincountError(f"{name(key)} and {origin[path]} conflict: {'.'.join(path)} cannot be both a value "
                             "and a section of settings")

    for key, value in dotted.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node, path = out, ()
        for part in parents:
            path += (part,)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise conflict(key, path)
            origin.setdefault(path, name(key))
            node = child
        path += (leaf,)
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise conflict(key, path)
        node[leaf] = value
        origin[path] = name(key)
    return out


CONFIG_ENV = "BINCOUNT_CONFIG"  # a config file's path, not a setting
CONFIG_NAME = "bincount.yaml"  # found in the current dir, else in the work dir


def env_layer(environ: dict[str, str]) -> dict[str, Any]:
    dotted, names = {}, {}
    for name, raw in environ.items():
        if name == CONFIG_ENV:
            continue
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower().replace("__", ".")
            names[key] = name
            try:
                dotted[key] = yaml.safe_load(raw) if raw.strip() else None
            except (yaml.YAMLError, RecursionError):
                dotted[key] = raw
            if dotted[key] is None:
                dotted[key] = raw
    return nest(dotted, lambda key: names[key])


def yaml_layer(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BincountError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_bytes()) or {}  # bytes: PyYAML reads UTF-8/16 and reports bad bytes
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        what = "not UTF-8 or UTF-16 text" if isinstance(exc, yaml.reader.ReaderError) else "invalid YAML"
        raise BincountError(f"config file {path}: {what}{where}") from None
    except RecursionError:
        raise BincountError(f"config file {path}: invalid YAML (nested too deeply)") from None
    except OSError as exc:
        raise BincountError(f"config file {path}: cannot read it ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise BincountError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def env_name(loc: tuple) -> str:
    return ENV_PREFIX + "__".join(str(p) for p in loc).upper()


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """`--set train.epochs=3` pairs as dotted overrides; values are read as YAML scalars."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BincountError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            out[key.strip()] = raw
    return out
