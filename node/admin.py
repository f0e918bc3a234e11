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
