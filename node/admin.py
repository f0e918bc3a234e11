"""Edits of config.toml by the admin CLI: comments and layout are kept (tomlkit), and the
result is validated as a whole before it replaces the file."""

from __future__ import annotations

import os
from pathlib import Path

import tomlkit
from tomlkit.items import AoT, Table

from node.config import parse_config
from node.errors import ConfigError


def _load(path: Path) -> tomlkit.TOMLDocument:
    if not path.exists():
        raise ConfigError("config", f"file not found: {path}")
    return tomlkit.parse(path.read_text(encoding="utf-8"))


def _save(path: Path, doc: tomlkit.TOMLDocument) -> None:
    parse_config(doc.unwrap(), base_dir=path.resolve().parent, source=path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


def _node_table(doc: tomlkit.TOMLDocument) -> Table:
    if "node" not in doc:
        doc["node"] = tomlkit.table()
    node = doc["node"]
    assert isinstance(node, Table)
    return node


def add_allowed_ae(path: Path, ae_title: str, host: str | None) -> None:
    doc = _load(path)
    node = _node_table(doc)
    allowed = node.get("allowed")
    if allowed is None:
        allowed = tomlkit.aot()
        node["allowed"] = allowed
    if any(item.get("ae_title") == ae_title for item in allowed):
        raise ConfigError("node.allowed", f"{ae_title!r} is already allowed")
    entry = tomlkit.table()
    entry["ae_title"] = ae_title
    if host:
        entry["host"] = host
    allowed.append(entry)
    _save(path, doc)


def remove_allowed_ae(path: Path, ae_title: str) -> None:
    doc = _load(path)
    allowed = _node_table(doc).get("allowed")
    if not isinstance(allowed, AoT) or not any(item.get("ae_title") == ae_title for item in allowed):
        raise ConfigError("node.allowed", f"{ae_title!r} is not in the list")
    index = next(i for i, item in enumerate(allowed) if item.get("ae_title") == ae_title)
    del allowed[index]
    _save(path, doc)


def _array(doc: tomlkit.TOMLDocument, key: str, create: bool = False) -> AoT:
    if key not in doc:
        if not create:
            raise ConfigError(key, "none configured")
        doc[key] = tomlkit.aot()
    items = doc[key]
    if not isinstance(items, AoT):
        raise ConfigError(key, "must be an array of tables")
    return items


def _index(items: AoT, name: str, key: str) -> int:
    found = [i for i, item in enumerate(items) if item.get("name") == name]
    if not found:
        raise ConfigError(key, f"no entry named {name!r}")
    return found[0]


def add_destination(path: Path, name: str, ae_title: str, host: str, port: int, max_attempts: int | None) -> None:
    doc = _load(path)
    items = _array(doc, "destinations", create=True)
    if any(item.get("name") == name for item in items):
        raise ConfigError("destinations", f"{name!r} already exists")
    entry = tomlkit.table()
    entry.update({"name": name, "ae_title": ae_title, "host": host, "port": port})
    if max_attempts is not None:
        entry["max_attempts"] = max_attempts
    items.append(entry)
    _save(path, doc)


def remove_destination(path: Path, name: str) -> None:
    """A destination a route still names cannot go (validation refuses the result)."""
    doc = _load(path)
    items = _array(doc, "destinations")
    del items[_index(items, name, "destinations")]
    if not items:
        del doc["destinations"]  # an empty array of tables would be written as `destinations = []`
    users = [r.get("name") for r in doc.get("routes", []) if name in r.get("destinations", [])]
    if users:
        raise ConfigError("destinations", f"{name!r} is used by route {', '.join(map(str, users))}; change it first")
    _save(path, doc)


def add_route(
    path: Path,
    name: str,
    model: str,
    destinations: list[str],
    match: dict[str, str],
    *,
    send_back: bool = False,
    forward_original: bool = False,
    position: int | None = None,
) -> None:
    """A route, last (or at `position`: routes are tried in order, the first match wins)."""
    doc = _load(path)
    items = _array(doc, "routes", create=True)
    if any(item.get("name") == name for item in items):
        raise ConfigError("routes", f"{name!r} already exists")
    entry = tomlkit.table()
    entry["name"] = name
    if match:
        inline = tomlkit.inline_table()
        inline.update(match)
        entry["match"] = inline
    entry["model"] = model
    entry["destinations"] = destinations
    if send_back:
        entry["send_back"] = True
    if forward_original:
        entry["forward_original"] = True
    if position is None or position >= len(items):
        items.append(entry)
    else:
        items.insert(max(0, position), entry)
    _save(path, doc)


def remove_route(path: Path, name: str) -> None:
    doc = _load(path)
    items = _array(doc, "routes")
    del items[_index(items, name, "routes")]
    if not items:
        del doc["routes"]
    _save(path, doc)
