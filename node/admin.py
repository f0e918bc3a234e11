"""Edits of config.toml by the admin CLI: comments and layout are kept (tomlkit), and the
result is validated as a whole before it replaces the file."""

from __future__ import annotations

import fcntl
import os
import stat
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Table

from core.errors import ConfigError
from node.config import parse_config


@contextmanager
def _editing(path: Path) -> Iterator[tomlkit.TOMLDocument]:
    """The parsed file, written back (validated, atomically, same permissions) when the
    block ends without an error; one edit at a time (CLI and dashboard may race)."""
    if not path.exists():
        raise ConfigError("config", f"file not found: {path}")
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            doc = tomlkit.parse(path.read_text(encoding="utf-8"))
        except TOMLKitError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
        try:
            yield doc
        except (AssertionError, TOMLKitError, TypeError) as exc:  # a layout the edit cannot handle
            raise ConfigError("config", f"cannot edit {path} automatically ({exc}); edit it by hand") from None
        text = tomlkit.dumps(doc)
        try:
            data = tomllib.loads(text)  # what will be on disk, not tomlkit's view of it
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"the edit would not be valid TOML ({exc}); edit {path} by hand") from None
        parse_config(data, base_dir=path.resolve().parent, source=path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # a 0600 file (it may hold a ledger password) stays so
        os.replace(tmp, path)


def _remove_entry(parent: Container | Table, key: str, items: AoT, index: int) -> None:
    """Deletes items[index] but keeps the comments after it: tomlkit files them under the
    entry above them, and they usually describe what follows (the shipped file's TLS example
    follows the allowed AEs)."""
    body = items[index].value.body
    trailing: list[Any] = []
    while body and body[-1][0] is None:
        trailing.insert(0, body.pop()[1])
    del items[index]
    if not len(items):
        del parent[key]
    if index > 0:
        target = items[index - 1].value
    elif isinstance(parent, Table):
        target = parent.value
    else:  # a top-level array: the end of the table before it
        before = [v for k, v in parent.body[: _position(parent, key)] if isinstance(v, Table)]
        target = before[-1].value if before else parent
    for item in trailing:
        target.append(None, item)


def _position(container: Container, key: str) -> int:
    keys = [i for i, (k, _) in enumerate(container.body) if k is not None and k.key == key]
    return keys[0] if keys else len(container.body)


def _node_table(doc: tomlkit.TOMLDocument) -> Table:
    if "node" not in doc:
        doc["node"] = tomlkit.table()
    node = doc["node"]
    if not isinstance(node, Table):
        raise ConfigError("node", "must be a table")
    return node


def add_allowed_ae(path: Path, ae_title: str, host: str | None) -> None:
    with _editing(path) as doc:
        node = _node_table(doc)
        allowed = _array(node, "allowed", "node.allowed", create=True)
        entry = _new_entry(allowed, "ae_title", ae_title, "node.allowed", "is already allowed")
        if host:
            entry["host"] = host
        allowed.append(entry)


def remove_allowed_ae(path: Path, ae_title: str) -> None:
    with _editing(path) as doc:
        node = _node_table(doc)
        allowed = _array(node, "allowed", "node.allowed")
        found = [i for i, item in enumerate(allowed) if item.get("ae_title") == ae_title]
        if not found:
            raise ConfigError("node.allowed", f"{ae_title!r} is not in the list")
        _remove_entry(node, "allowed", allowed, found[0])


def _array(parent: Container | Table, key: str, name: str, create: bool = False) -> AoT:
    if key not in parent:
        if not create:
            raise ConfigError(name, "none configured")
        parent[key] = tomlkit.aot()
    items = parent[key]
    if not isinstance(items, AoT):
        raise ConfigError(name, f"is not written as [[{name}]] tables; edit it by hand")
    return items


def _new_entry(items: AoT, field: str, value: str, key: str, taken: str) -> Table:
    """A new table for `items` whose `field` is `value`, which no entry may have yet."""
    if any(item.get(field) == value for item in items):
        raise ConfigError(key, f"{value!r} {taken}")
    entry = tomlkit.table()
    entry[field] = value
    return entry


def _index(items: AoT, name: str, key: str) -> int:
    found = [i for i, item in enumerate(items) if item.get("name") == name]
    if not found:
        raise ConfigError(key, f"no entry named {name!r}")
    return found[0]


def add_destination(path: Path, name: str, ae_title: str, host: str, port: int, max_attempts: int | None) -> None:
    with _editing(path) as doc:
        items = _array(doc, "destinations", "destinations", create=True)
        entry = _new_entry(items, "name", name, "destinations", "already exists")
        entry.update({"ae_title": ae_title, "host": host, "port": port})
        if max_attempts is not None:
            entry["max_attempts"] = max_attempts
        items.append(entry)


def remove_destination(path: Path, name: str) -> None:
    """A destination a route still names cannot go."""
    with _editing(path) as doc:
        items = _array(doc, "destinations", "destinations")
        index = _index(items, name, "destinations")
        users = [str(r.get("name")) for r in doc.get("routes", []) if name in r.get("destinations", [])]
        if users:
            raise ConfigError("destinations", f"{name!r} is used by route {', '.join(users)}; change it first")
        _remove_entry(doc, "destinations", items, index)


def add_route(
    path: Path,
    name: str,
    model: str,
    destinations: list[str],
    match: Mapping[str, str | list[str]],
    *,
    send_back: bool = False,
    forward_original: bool = False,
    chain_from: list[str] | None = None,
    position: int | None = None,
) -> None:
    """A route, last (or at `position`: routes are tried in order, the first match wins)."""
    with _editing(path) as doc:
        items = _array(doc, "routes", "routes", create=True)
        entry = _new_entry(items, "name", name, "routes", "already exists")
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
        if chain_from:
            entry["chain_from"] = chain_from
        if position is None or position >= len(items):
            items.append(entry)
        else:
            items.insert(max(0, position), entry)


def remove_route(path: Path, name: str) -> None:
    with _editing(path) as doc:
        items = _array(doc, "routes", "routes")
        _remove_entry(doc, "routes", items, _index(items, name, "routes"))
