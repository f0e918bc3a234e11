"""The node's configuration: one frozen, typed object, loaded and validated at the entry point.

Each setting's default and rules are declared once, on its dataclass field (`setting()`), and
every config object checks itself when it is built (`__post_init__`), so one built in code
fails as a config file with the same value does. The TOML reader takes the settings from the
fields (names, types, defaults) and adds only what a file needs: unknown keys, key paths with
array indices, relative paths, environment overrides and cross-references.

Every error names the key it is about, so `enhance-node` can exit 2 with a one-line reason.
Relative paths are resolved against the config file's folder (or the working directory for
the embedded defaults). Environment variables may override paths and secrets only, and the
one setting that names a process rather than a deployment (node.host_id).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, ClassVar, TypeVar, dataclass_transform

from core.errors import ConfigError

ENV_CONFIG = "ENHANCE_NODE_CONFIG"
ENV_STORAGE_DIR = "ENHANCE_NODE_STORAGE_DIR"
ENV_LEDGER_URL = "ENHANCE_NODE_LEDGER_URL"
ENV_ADMIN_PASSWORD_HASH = "ENHANCE_NODE_ADMIN_PASSWORD_HASH"
ENV_HOST_ID = "ENHANCE_NODE_HOST_ID"

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls
_NAME = r"[A-Za-z0-9_.-]{1,64}"  # a destination, route or model name
BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")
# a denoising route's strength: the share of what the model removes that is taken away
# (GE's TrueFidelity offers Low/Medium/High the same way); "high" is the model's full output
STRENGTHS = {"low": 0.5, "medium": 0.75, "high": 1.0}
QA_POLICIES = ("fail", "deliver-with-warning")

_T = TypeVar("_T")
_REQUIRED: Any = MISSING  # a setting() without a default must be given


def _ae_title_problem(value: str) -> str | None:
    if not _AE_CHARS.match(value) or not value.strip():
        return "must be 1-16 printable characters, no backslash"
    if value != value.strip():
        return "must not start or end with spaces"
    return None


def _ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"not an IP address: {value!r}"
    return None


def _ledger_url_problem(value: str) -> str | None:
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        return "must be a sqlite:/// or postgresql+psycopg:// URL"
    return None


def _regex_problem(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


def _duplicate(values: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


@dataclass(frozen=True)
class _Setting:
    """What `setting()` declares besides the default: the rules a value must satisfy beyond
    its type (None, an unset optional, satisfies them) and the environment variable that may
    override config.toml."""

    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # the whole value must match
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # says what is wrong, None when nothing is
    env: str | None = None  # paths and secrets only (DESIGN 3.2)

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum}, not {value}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum}, not {value}"
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"{value!r} does not match {self.pattern}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        return self.check(value) if self.check is not None else None


_PLAIN = _Setting()  # a field declared without setting()


def setting(
    *,
    default: _T = _REQUIRED,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: str | None = None,
    choices: Iterable[str] = (),
    check: Callable[[Any], str | None] | None = None,
    env: str | None = None,
) -> _T:
    """A config field with its default (none: it must be given) and the rules its value must
    satisfy, which the object's __post_init__ checks however it was built. `default` is a
    keyword so that type checkers see which fields have one."""
    spec = _Setting(minimum, maximum, pattern, tuple(choices), check, env)
    return field(default=default, metadata={"setting": spec})


@dataclass_transform(frozen_default=True, field_specifiers=(setting, field))
def config_class(cls: type[_T]) -> type[_T]:
    """A frozen dataclass whose `setting()` fields type checkers read as dataclasses.field."""
    return dataclass(frozen=True)(cls)


class _Settings:
    """Base of the config objects: every field is checked against its type and its setting()'s
    rules when the object is built; a class with cross-field rules checks them in its own
    __post_init__ after this one."""

    KEY: ClassVar[str]  # where the object sits in config.toml: its errors' keys start with it
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name]) or f.metadata.get("setting", _PLAIN).problem(value)
            if problem is not None:
                raise self._error(f.name, problem)
            if hints[f.name] is float and type(value) is int:  # TOML's 30 is 30.0 to a float setting
                object.__setattr__(self, f.name, float(value))

    def _error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.KEY}.{name}" if self.KEY else name, reason)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The field types of `cls`, evaluated (the annotations are strings) once per class."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` is not of type `hint` (None when it is); a bool is no number, an int is a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (UnionType, typing.Union):  # X | None
        (kind,) = (a for a in args if a is not NoneType)
        return None if value is None else _type_problem(value, kind)
    if origin in (list, tuple):  # list[X] or tuple[X, ...]
        if isinstance(value, origin) and all(_type_problem(v, args[0]) is None for v in value):
            return None
        return f"must be a {origin.__name__} of {'strings' if args[0] is str else args[0].__name__}"
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, not {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, not {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, not {type(value).__name__}"
    return None if isinstance(value, hint) else f"must be a {hint.__name__}, not {type(value).__name__}"


@config_class
class AllowedAE(_Settings):
    KEY = "node.allowed"

    ae_title: str = setting(check=_ae_title_problem)
    host: str | None = setting(default=None, check=_ip_problem)  # when set the peer address must match


@config_class
class TLSConfig(_Settings):
    KEY = "tls"

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # when set, client certificates are required and verified


@config_class
class NodeConfig(_Settings):
    KEY = "node"

    ae_title: str = setting(default="ENHANCE", check=_ae_title_problem)
    host: str = setting(default="0.0.0.0", check=_ip_problem)
    port: int = setting(default=11112, minimum=0, maximum=65535)
    storage_dir: Path = setting(default=Path("var/storage"), env=ENV_STORAGE_DIR)
    ledger_url: str = setting(default="sqlite:///var/ledger.db", check=_ledger_url_problem, env=ENV_LEDGER_URL)
    max_associations: int = setting(default=16, minimum=1, maximum=1024)
    min_free_disk_mb: int = setting(default=1024, minimum=0)  # below this: refuse with 0xA700
    max_pdu_size: int = setting(default=0, minimum=0)  # 0 = unlimited: fewer, larger P-DATA PDUs from the sender
    network_timeout: float = setting(default=60.0, minimum=1.0)  # an association silent this long is aborted
    # a connection that has not negotiated an association by then is closed
    negotiation_timeout: float = setting(default=5.0, minimum=0.5)
    # per receiving process; an allowed AE's `host` is exempt
    max_connections_per_host: int = setting(default=8, minimum=1, maximum=4096)
    # per receiving process, every host but allowed AEs' `host` together (each connection is a
    # thread and a file descriptor; the usual limit is 1024 descriptors a process)
    max_connections: int = setting(default=256, minimum=1, maximum=65536)
    # a deflated data set inflating beyond this is refused (a deflate bomb)
    max_inflated_mb: int = setting(default=512, minimum=1, maximum=1 << 20)
    # a C-STORE data set larger than this aborts its association: the SCP holds a data set whole
    # (two copies at the peak) while it checks and writes it, so this bounds what one
    # association can make it hold
    max_dataset_mb: int = setting(default=2048, minimum=1, maximum=1 << 20)
    # SCP processes sharing the port; 0 = one per CPU core (max 8)
    receive_processes: int = setting(default=0, minimum=0, maximum=64)
    allowed: tuple[AllowedAE, ...] = ()  # empty: refuse all
    tls: TLSConfig | None = None
    # accept private and unknown SOP classes as storage (pynetdicom's unrestricted storage
    # service); the standard's storage classes are always accepted
    accept_unknown_sop_classes: bool = False
    # what this `serve` process is called in the ledger (associations it holds, the jobs and
    # deliveries its workers and senders lease); None: hostname:port. Each process sharing a
    # ledger needs its own (docs/deployment.md, "Host identities"): unlike other settings it
    # differs per process, not per file, so the environment may set it too
    host_id: str | None = setting(default=None, pattern=r"[A-Za-z0-9_.:-]{1,64}", env=ENV_HOST_ID)

    def __post_init__(self) -> None:
        super().__post_init__()
        twice = _duplicate(a.ae_title for a in self.allowed)
        if twice is not None:
            raise self._error("allowed", f"duplicate ae_title {twice!r}")

    def allowed_ae(self, calling_ae: str) -> AllowedAE | None:
        return next((a for a in self.allowed if a.ae_title == calling_ae), None)


@config_class
class SeriesConfig(_Settings):
    KEY = "series"

    idle_seconds: float = setting(default=30.0, minimum=0.0)


@config_class
class DestinationConfig(_Settings):
    KEY = "destinations"

    name: str = setting(pattern=_NAME)
    ae_title: str = setting(check=_ae_title_problem)
    host: str
    port: int = setting(minimum=1, maximum=65535)
    # then the delivery is 'failed' (visible, retryable), never looped
    max_attempts: int = setting(default=8, minimum=1, maximum=1000)


@config_class
class RouteMatch(_Settings):
    KEY = "routes.match"

    modality: str = "*"
    calling_ae: str = "*"
    series_description: str = setting(default=".*", check=_regex_problem)
    image_type: tuple[str, ...] = ()  # values every image's ImageType must hold, e.g. ("AXIAL",)
    sop_classes: tuple[str, ...] = ()  # UIDs; every instance's SOP class must be one; () = any


@config_class
class RouteConfig(_Settings):
    KEY = "routes"

    name: str = setting(pattern=_NAME)
    model: str = setting(pattern=_NAME)  # a folder under worker.models_dir
    destinations: tuple[str, ...]
    match: RouteMatch = RouteMatch()
    send_back: bool = False  # also to the destination whose ae_title is the series' calling AE
    forward_original: bool = False  # also send the source series as received (node inline)
    strength: str = setting(default="high", choices=STRENGTHS)  # denoising: a key of STRENGTHS
    # what a series the QA gate rejects becomes
    on_qa_fail: str = setting(default="fail", choices=QA_POLICIES)
    # models whose output this route may process (a deliberate chain, e.g. ct-sr2 after
    # ct-denoise); any other enhance-node output is skipped as own output (node/routing.py)
    chain_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model in self.chain_from:
            raise self._error("chain_from", f"a model never processes its own output ({self.model!r})")
        if self.forward_original and not (self.destinations or self.send_back):
            raise self._error("forward_original", "needs destinations or send_back")


@config_class
class QALimits(_Settings):
    """The worker's QA gate (engines/qa.py, docs/processing.md): a series whose worst slice
    exceeds any limit is handled by its route's on_qa_fail. The defaults let every shipped
    model pass on the held-out images of bench/robustness.py and stop gross failures (a blur
    of 2 pixels, a 10 HU shift, halos round every edge)."""

    KEY = "qa"

    # CT: 99th percentile of the 31x31 local mean of what was removed
    max_residual_mean_hu: float = setting(default=12.0, minimum=0.0)
    # SD of what was removed / the input's estimated noise SD
    max_removed_ratio: float = setting(default=2.0, minimum=0.0)
    # what was removed at the strongest edges / the noise SD
    max_edge_ratio: float = setting(default=3.0, minimum=0.0)
    # SR: output averaged back to the input grid vs the input
    max_inconsistency_percent: float = setting(default=3.0, minimum=0.0)
    # SR: pixels beyond the range of the input around them
    max_overshoot_percent: float = setting(default=8.0, minimum=0.0)

    def failures(self, figures: dict[str, float], ct: bool) -> list[str]:
        """One line per limit the figures exceed (empty: the series passes)."""
        checks = [
            ("residual_mean", self.max_residual_mean_hu if ct else None, "HU"),
            ("removed_ratio", self.max_removed_ratio, "x noise"),
            ("edge_ratio", self.max_edge_ratio, "x noise"),
            ("inconsistency", self.max_inconsistency_percent, "%"),
            ("overshoot", self.max_overshoot_percent, "%"),
        ]
        return [
            f"{name} {figures[name]:.2f} {unit} > {limit:g}"
            for name, limit, unit in checks
            if limit is not None and name in figures and figures[name] > limit
        ]


@config_class
class WorkerConfig(_Settings):
    KEY = "worker"

    backend: str = setting(default="auto", choices=BACKENDS)
    device: str = setting(default="auto", pattern=r"auto|cpu|cuda(:\d+)?")
    # worker processes (one engine each); 0 = no worker in this node
    processes: int = setting(default=1, minimum=0, maximum=16)
    # onnxruntime intra-op threads per process; 0 = one per core
    threads: int = setting(default=0, minimum=0, maximum=256)
    max_batch: int = setting(default=8, minimum=1, maximum=1024)  # slices or tiles per inference call
    models_dir: Path = Path("models")  # route.model names a folder here
    plan_cache: Path = Path("var/plans")  # TensorRT plans
    heartbeat_seconds: float = setting(default=5.0, minimum=0.05)
    stale_after_seconds: float = setting(default=60.0, minimum=0.2)  # a running job silent this long is re-queued
    max_attempts: int = setting(default=3, minimum=1, maximum=100)
    # derived SeriesNumber = source + offset
    series_number_offset: int = setting(default=1000, minimum=0, maximum=2**31 - 1)
    # derived SeriesDescription = source + suffix
    series_description_suffix: str = setting(default=" enhanced", pattern=r"[^\\]{0,32}")
    # added when a route delivers a series its QA failed
    qa_warning_suffix: str = setting(default=" QA WARNING", pattern=r"[^\\]{1,24}")
    qa: QALimits = QALimits()  # [qa] in config.toml
    # an image whose decoded frames would take more is refused
    max_decoded_mb: int = setting(default=4096, minimum=1, maximum=1 << 22)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise self._error("stale_after_seconds", "must be more than twice heartbeat_seconds")


@config_class
class SenderConfig(_Settings):
    KEY = "sender"

    processes: int = setting(default=1, minimum=0, maximum=16)  # sender processes; 0 = no delivery from this node
    # deliveries in flight per process (one association each)
    concurrency: int = setting(default=4, minimum=1, maximum=64)
    # seconds: connect, association negotiation and each DIMSE response
    timeout: float = setting(default=30.0, minimum=0.5)
    # the first retry waits about this long, then doubling
    retry_base_seconds: float = setting(default=10.0, minimum=0.01)
    retry_max_seconds: float = setting(default=600.0, minimum=0.01)
    heartbeat_seconds: float = setting(default=5.0, minimum=0.05)
    # a delivery `sending` silent this long is re-queued
    stale_after_seconds: float = setting(default=120.0, minimum=0.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retry_max_seconds < self.retry_base_seconds:
            raise self._error("retry_max_seconds", "must be >= retry_base_seconds")
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise self._error("stale_after_seconds", "must be more than twice heartbeat_seconds")


@config_class
class DashboardConfig(_Settings):
    KEY = "dashboard"

    host: str = setting(default="127.0.0.1", check=_ip_problem)
    port: int = setting(default=8080, minimum=0, maximum=65535)
    admin_password_hash: str | None = setting(default=None, env=ENV_ADMIN_PASSWORD_HASH)
    tls: TLSConfig | None = None  # HTTPS, and the session cookie marked Secure (no ca_file)


@config_class
class Config(_Settings):
    KEY = ""  # the root: its errors name whole keys

    node: NodeConfig = NodeConfig()
    series: SeriesConfig = SeriesConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    worker: WorkerConfig = WorkerConfig()
    sender: SenderConfig = SenderConfig()
    dashboard: DashboardConfig = DashboardConfig()
    source: Path | None = field(default=None, compare=False)  # the file it came from

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, items in (("destinations", self.destinations), ("routes", self.routes)):
            twice = _duplicate(item.name for item in items)
            if twice is not None:
                raise ConfigError(key, f"duplicate name {twice!r}")
        known = {d.name for d in self.destinations}
        for i, route in enumerate(self.routes):
            for name in route.destinations:
                if name not in known:
                    raise ConfigError(f"routes[{i}].destinations", f"no destination named {name!r}")


def default_config_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or "config.toml")


def load_config(path: Path | None = None, *, required: bool = False) -> Config:
    """Read and validate `path` (default: $ENHANCE_NODE_CONFIG, then ./config.toml).

    A missing default file gives the embedded defaults; a missing explicit file is an error.
    """
    explicit = path is not None or ENV_CONFIG in os.environ
    path = path or default_config_path()
    if not path.exists():
        if explicit or required:
            raise ConfigError("config", f"file not found: {path}")
        return parse_config({}, base_dir=Path.cwd())
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, source=path)


def parse_config(data: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document into a Config (pure apart from reading the env)."""
    root = _Table(data, "")
    node_t = root.table("node")
    allowed = tuple(_read(AllowedAE, t, base_dir) for t in node_t.tables("allowed"))
    node = _read(NodeConfig, node_t, base_dir, allowed=allowed, tls=_read_tls(node_t, base_dir, client_ca=True))
    # a relative SQLite path is relative to the file, as every other path is
    node = replace(node, ledger_url=_resolve_sqlite_url(node.ledger_url, base_dir))
    series = _read(SeriesConfig, root.table("series"), base_dir)
    destinations = tuple(_read(DestinationConfig, t, base_dir) for t in root.tables("destinations"))
    routes = tuple(_read_route(t, base_dir) for t in root.tables("routes"))
    worker = _read(WorkerConfig, root.table("worker"), base_dir, qa=_read(QALimits, root.table("qa"), base_dir))
    sender = _read(SenderConfig, root.table("sender"), base_dir)
    dash_t = root.table("dashboard")
    dashboard = _read(DashboardConfig, dash_t, base_dir, tls=_read_tls(dash_t, base_dir, client_ca=False))
    root.done()
    return Config(node, series, destinations, routes, worker, sender, dashboard, source)


_S = TypeVar("_S", bound=_Settings)
# how TOML writes the types of fields it cannot hold as they are
_TOML_TYPES: dict[Any, Any] = {Path: str, Path | None: str | None, tuple[str, ...]: list[str]}


def _read(cls: type[_S], t: _Table, base_dir: Path, **given: Any) -> _S:
    """`cls` from table `t`: each field not `given` from its key, else its environment
    variable, else its default; paths resolved against `base_dir`. The object checks itself;
    its errors are re-keyed with the table's path (`routes[2].strength`, not `routes.strength`)."""
    values = dict(given)
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in given:  # read by the caller (a table of its own), or not a key of this table
            continue
        hint = hints[f.name]
        value = t.value(f.name, _TOML_TYPES.get(hint, hint))
        env = f.metadata.get("setting", _PLAIN).env
        if env is not None:
            value = os.environ.get(env) or value
        if value is None:
            if f.default is MISSING:
                raise ConfigError(t.key(f.name), "is required")
            value = f.default
        if hint in (Path, Path | None) and value is not None:
            value = _resolve(Path(value), base_dir)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        obj = cls(**values)
    except ConfigError as exc:
        raise ConfigError(t.key(exc.key.removeprefix(f"{cls.KEY}.")), exc.reason) from None
    t.done()
    return obj


def _read_tls(t: _Table, base_dir: Path, *, client_ca: bool) -> TLSConfig | None:
    if not t.has("tls"):
        return None
    tt = t.table("tls")
    tls = _read(TLSConfig, tt, base_dir, **({} if client_ca else {"ca_file": None}))
    for name, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("ca_file", tls.ca_file)):
        if path is not None and not path.is_file():
            raise ConfigError(tt.key(name), f"file not found: {path}")
    return tls


def _read_route(t: _Table, base_dir: Path) -> RouteConfig:
    m = t.table("match")
    image_type = m.value("image_type", list[str]) or []
    sop_classes = m.value("sop_classes", list[str]) or []
    match = _read(
        RouteMatch,
        m,
        base_dir,
        image_type=tuple(v.strip().upper() for v in image_type),
        sop_classes=tuple(_sop_class(v, m.key("sop_classes")) for v in sop_classes),
    )
    return _read(RouteConfig, t, base_dir, match=match)


def _sop_class(value: str, key: str) -> str:
    """A SOP Class UID, given as the UID or as its keyword (CTImageStorage)."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) and len(value) <= 64:
        return value
    from pydicom._uid_dict import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == value:
            return uid
    raise ConfigError(key, f"{value!r} is neither a UID nor a SOP class keyword such as CTImageStorage")


def _resolve(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else base_dir / path


def _resolve_sqlite_url(url: str, base_dir: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
        return prefix + str(base_dir / url[len(prefix) :])
    return url


class _Table:
    """Key-naming access to one TOML table; `done()` rejects unknown keys."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def has(self, name: str) -> bool:
        return name in self._data

    def value(self, name: str, toml_type: Any) -> Any:
        """The key's value (None when absent), which must be a `toml_type`."""
        self._used.add(name)
        value = self._data.get(name)
        if value is not None:
            problem = _type_problem(value, toml_type)
            if problem is not None:
                raise ConfigError(self.key(name), problem)
        return value

    def table(self, name: str) -> _Table:
        self._used.add(name)
        value = self._data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(self.key(name), "must be a table")
        return _Table(value, f"{self.key(name)}.")

    def tables(self, name: str) -> list[_Table]:
        self._used.add(name)
        value = self._data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(self.key(name), f"must be an array of tables ([[{self.key(name)}]])")
        return [_Table(v, f"{self.key(name)}[{i}].") for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")
