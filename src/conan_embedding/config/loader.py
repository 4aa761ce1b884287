"""The one loader of every YAML config into its pydantic model: :func:`load_yaml`.

A wrong or misspelt key is an error that names the file and the key path, every problem of
the file at once, e.g. ``configs/x.yaml: optim.lrr: Extra inputs are not permitted``. A file
may start from another: ``base: full`` plus dotted ``set:`` / ``drop:`` keys (list items of
``tasks`` addressed by name), see :func:`read_yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config that cannot be read or validated; the message is ``file: key: problem``
    (every problem of the file, joined with ``; ``)."""


M = TypeVar("M", bound=BaseModel)

# keys of a config file that are loader directives, not config keys
_DIRECTIVES = ("base", "set", "drop")


def recipe_path(name: str) -> Path | None:
    """The packaged recipe called ``name`` (``minilm-v1``, ``v1/full``), if there is one."""
    from importlib import resources

    candidate = Path(str(resources.files("conan_embedding") / "recipes" / f"{name}.yaml"))
    return candidate if candidate.is_file() else None


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, else the packaged recipe of that name; a ConfigError when neither."""
    if not Path(path).exists() and recipe_path(str(path)) is not None:
        return recipe_path(str(path))  # type: ignore[return-value]
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file (nor a packaged recipe of that name)")
    return Path(path)


def _segment(node: Any, key: str, dotted: str) -> tuple[Any, Any]:
    """(container, index) of ``key`` in ``node``: a mapping key, or in a list of mappings the
    item whose ``name`` is ``key`` (index ``None`` when there is no such item)."""
    if isinstance(node, dict):
        return node, key
    if isinstance(node, list) and all(isinstance(item, dict) for item in node):
        for i, item in enumerate(node):
            if item.get("name") == key:
                return node, i
        return node, None
    raise ValueError(f"cannot address {key!r} inside a {type(node).__name__} ({dotted})")


def _walk(raw: dict[str, Any], dotted: str, create: bool) -> tuple[Any, Any, str]:
    """The container holding the last key of ``dotted``, its index there, and that key.
    Mapping keys on the way are created when ``create``; list items never are."""
    *parents, leaf = dotted.split(".")
    node: Any = raw
    for key in parents:
        container, index = _segment(node, key, dotted)
        if index is None:
            raise ValueError(f"no item named {key!r} (list items are addressed by their name)")
        child = container[index] if isinstance(container, list) else container.get(index)
        if child is None:
            if not create or isinstance(container, list):
                raise ValueError(f"{key!r} is not set")
            child = container[index] = {}
        node = child
    container, index = _segment(node, leaf, dotted)
    return container, index, leaf


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign ``value`` at ``dotted`` (``optim.lr``, ``tasks.bge.negatives``) in place.

    A list of named mappings (``tasks``) is addressed by item name. Setting an item that does
    not exist adds it (``value`` a mapping; its ``name`` is the key), at the end, or where its
    ``_after: <name>`` / ``_before: <name>`` says. ``None`` sets ``null``; ``drop`` removes."""
    container, index, leaf = _walk(raw, dotted, create=True)
    if isinstance(container, dict):
        container[leaf] = value
        return
    if not isinstance(value, dict):
        raise ValueError(f"a list item ({leaf!r}) must be set to a mapping")
    if value.get("name", leaf) != leaf:
        raise ValueError(f"the item's name {value['name']!r} is not its key {leaf!r}")
    item = {"name": leaf, **{k: v for k, v in value.items() if k not in ("_after", "_before")}}
    if index is not None:
        container[index] = item
        return
    anchor = value.get("_after") or value.get("_before")
    if anchor is None:
        container.append(item)
        return
    names = [other.get("name") for other in container]
    if anchor not in names:
        raise ValueError(f"no item named {anchor!r} to put {leaf!r} next to")
    container.insert(names.index(anchor) + (1 if "_after" in value else 0), item)


def drop_dotted(raw: dict[str, Any], dotted: str) -> None:
    """Remove the key (or named list item) at ``dotted``; an error when it is not there."""
    container, index, leaf = _walk(raw, dotted, create=False)
    if isinstance(container, dict):
        if leaf not in container:
            raise ValueError("not set, nothing to drop")
        del container[leaf]
    elif index is None:
        raise ValueError(f"no item named {leaf!r} to drop")
    else:
        del container[index]


def read_yaml(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` / ``set:`` / ``drop:`` directives resolved.

    ``base: full`` starts from ``full.yaml`` beside this file (a value ending in ``.yaml`` is
    a path relative to this file's folder); the file's other top-level keys then replace the
    base's, ``set:`` assigns dotted keys (see :func:`set_dotted`) and ``drop:`` removes
    dotted keys. A base may itself have a base."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: base: a cycle ({chain})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if not any(key in raw for key in _DIRECTIVES):
        return raw
    problems: list[str] = []
    base = raw.pop("base", None)
    edits = raw.pop("set", None) or {}
    drops = raw.pop("drop", None) or []
    merged: dict[str, Any] = {}
    if base is not None:
        name = str(base)
        base_path = path.parent / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if not base_path.is_file():
            raise ConfigError(f"{path}: base: no file {base_path}")
        merged = read_yaml(base_path, (*_seen, path.resolve()))
    merged.update(raw)
    if not isinstance(edits, dict):
        problems.append("set: must be a mapping of dotted keys to values")
        edits = {}
    if not isinstance(drops, list):
        problems.append("drop: must be a list of dotted keys")
        drops = []
    for dotted, value in edits.items():
        try:
            set_dotted(merged, str(dotted), value)
        except ValueError as err:
            problems.append(f"set.{dotted}: {err}")
    for dotted in drops:
        try:
            drop_dotted(merged, str(dotted))
        except ValueError as err:
            problems.append(f"drop.{dotted}: {err}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return merged


def _location(loc: tuple[Any, ...], raw: Any) -> str:
    """A pydantic error location as a dotted key, list items by name where they have one."""
    parts: list[str] = []
    node = raw
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            node = node[part]
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(str(name) if isinstance(name, str) else str(part))
            continue
        node = node.get(part) if isinstance(node, dict) else None
        parts.append(str(part))
    return ".".join(parts) or "<top>"


def load_yaml(
    path: str | os.PathLike[str], model: type[M], overrides: Mapping[str, Any] | None = None
) -> M:
    """The one loader of every YAML config: read ``path`` (or the packaged recipe of that
    name), resolve ``base:`` / ``set:`` / ``drop:`` (:func:`read_yaml`), apply ``overrides``
    (dotted keys, :func:`set_dotted`; ``None`` sets ``null``, so leave out what is unset),
    validate into ``model``. Every problem at once: ``file: key: problem; key: problem``."""
    path = resolve_config_path(path)
    raw = read_yaml(path)
    problems: list[str] = []
    for dotted, value in (overrides or {}).items():
        try:
            set_dotted(raw, dotted, value)
        except ValueError as err:
            problems.append(f"{dotted}: {err}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = [f"{_location(e['loc'], raw)}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
