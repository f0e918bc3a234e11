"""The node's configuration: one frozen, typed object, loaded and validated at the entry point.

Every error names the key it is about, so `enhance-node` can exit 2 with a one-line reason.
Relative paths are resolved against the config file's folder (or the working directory for
the embedded defaults). Environment variables may override paths and secrets only.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

ENV_CONFIG = "ENHANCE_NODE_CONFIG"
ENV_STORAGE_DIR = "ENHANCE_NODE_STORAGE_DIR"
ENV_LEDGER_URL = "ENHANCE_NODE_LEDGER_URL"
ENV_ADMIN_PASSWORD_HASH = "ENHANCE_NODE_ADMIN_PASSWORD_HASH"

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls
BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")
# a denoising route's strength: the share of what the model removes that is taken away
# (GE's TrueFidelity offers Low/Medium/High the same way); "high" is the model's full output
STRENGTHS = {"low": 0.5, "medium": 0.75, "high": 1.0}
QA_POLICIES = ("fail", "deliver-with-warning")


@dataclass(frozen=True)
class AllowedAE:
    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # when set, client certificates are required and verified


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "ENHANCE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: Path = Path("var/storage")
    ledger_url: str = "sqlite:///var/ledger.db"
    max_associations: int = 16
    min_free_disk_mb: int = 1024
    max_pdu_size: int = 0  # 0 = unlimited: fewer, larger P-DATA PDUs from the sender
    network_timeout: float = 60.0  # an association silent this long is aborted
    negotiation_timeout: float = 5.0  # a connection that has not negotiated an association by then is closed
    max_connections_per_host: int = 8  # per receiving process; an allowed AE's `host` is exempt
    max_inflated_mb: int = 512  # a deflated data set inflating beyond this is refused (a deflate bomb)
    receive_processes: int = 0  # SCP processes sharing the port; 0 = one per CPU core (max 8)
    allowed: tuple[AllowedAE, ...] = ()
    tls: TLSConfig | None = None
    # accept private and unknown SOP classes as storage (pynetdicom's unrestricted storage
    # service); the standard's storage classes are always accepted
    accept_unknown_sop_classes: bool = False

    def allowed_ae(self, calling_ae: str) -> AllowedAE | None:
        return next((a for a in self.allowed if a.ae_title == calling_ae), None)


@dataclass(frozen=True)
class SeriesConfig:
    idle_seconds: float = 30.0


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    ae_title: str
    host: str
    port: int
    max_attempts: int = 8


@dataclass(frozen=True)
class RouteMatch:
    modality: str = "*"
    calling_ae: str = "*"
    series_description: str = ".*"
    image_type: tuple[str, ...] = ()  # values every image's ImageType must hold, e.g. ("AXIAL",)
    sop_classes: tuple[str, ...] = ()  # UIDs; every instance's SOP class must be one; () = any


@dataclass(frozen=True)
class RouteConfig:
    name: str
    model: str
    destinations: tuple[str, ...]
    match: RouteMatch = RouteMatch()
    send_back: bool = False  # also to the destination whose ae_title is the series' calling AE
    forward_original: bool = False  # also send the source series as received (node inline)
    strength: str = "high"  # denoising: a key of STRENGTHS
    on_qa_fail: str = "fail"  # a key of QA_POLICIES: what a series the QA gate rejects becomes
    # models whose output this route may process (a deliberate chain, e.g. ct-sr2 after
    # ct-denoise); any other enhance-node output is skipped as own output (node/routing.py)
    chain_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class QALimits:
    """The worker's QA gate (engines/qa.py, docs/processing.md): a series whose worst slice
    exceeds any limit is handled by its route's on_qa_fail. The defaults let every shipped
    model pass on the held-out images of bench/robustness.py and stop gross failures (a blur
    of 2 pixels, a 10 HU shift, halos round every edge)."""

    max_residual_mean_hu: float = 12.0  # CT: 99th percentile of the 31x31 local mean of what was removed
    max_removed_ratio: float = 2.0  # SD of what was removed / the input's estimated noise SD
    max_edge_ratio: float = 3.0  # what was removed at the strongest edges / the noise SD
    max_inconsistency_percent: float = 3.0  # SR: output averaged back to the input grid vs the input
    max_overshoot_percent: float = 8.0  # SR: pixels beyond the range of the input around them

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


@dataclass(frozen=True)
class WorkerConfig:
    backend: str = "auto"
    device: str = "auto"
    processes: int = 1  # worker processes (one engine each); 0 = no worker in this node
    threads: int = 0  # onnxruntime intra-op threads per process; 0 = one per core
    max_batch: int = 8  # slices or tiles per inference call
    models_dir: Path = Path("models")  # route.model names a folder here
    plan_cache: Path = Path("var/plans")  # TensorRT plans
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 60.0  # a running job silent this long is re-queued
    max_attempts: int = 3
    series_number_offset: int = 1000  # derived SeriesNumber = source + offset
    series_description_suffix: str = " enhanced"  # derived SeriesDescription = source + suffix
    qa_warning_suffix: str = " QA WARNING"  # added when a route delivers a series its QA failed
    qa: QALimits = QALimits()
    max_decoded_mb: int = 4096  # an image whose decoded frames would take more is refused


@dataclass(frozen=True)
class SenderConfig:
    processes: int = 1  # sender processes; 0 = no delivery from this node
    concurrency: int = 4  # deliveries in flight per process (one association each)
    timeout: float = 30.0  # seconds: connect, association negotiation and each DIMSE response
    retry_base_seconds: float = 10.0  # the first retry waits about this long, then doubling
    retry_max_seconds: float = 600.0
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 120.0  # a delivery `sending` silent this long is re-queued


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_password_hash: str | None = None
    tls: TLSConfig | None = None  # HTTPS, and the session cookie marked Secure


@dataclass(frozen=True)
class Config:
    node: NodeConfig = NodeConfig()
    series: SeriesConfig = SeriesConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    worker: WorkerConfig = WorkerConfig()
    sender: SenderConfig = SenderConfig()
    dashboard: DashboardConfig = DashboardConfig()
    source: Path | None = field(default=None, compare=False)  # the file it came from


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
    reader = _Table(data, "")
    node = _parse_node(reader.table("node"), base_dir)
    series_t = reader.table("series")
    series = SeriesConfig(idle_seconds=series_t.number("idle_seconds", 30.0, minimum=0.0))
    series_t.done()
    destinations = tuple(_parse_destination(t) for t in reader.tables("destinations"))
    _unique([d.name for d in destinations], "destinations", "name")
    routes = tuple(_parse_route(t, {d.name for d in destinations}) for t in reader.tables("routes"))
    _unique([r.name for r in routes], "routes", "name")
    worker_t = reader.table("worker")
    worker = WorkerConfig(
        backend=worker_t.choice("backend", "auto", BACKENDS),
        device=worker_t.string("device", "auto", pattern=r"auto|cpu|cuda(:\d+)?"),
        processes=worker_t.integer("processes", 1, minimum=0, maximum=16),
        threads=worker_t.integer("threads", 0, minimum=0, maximum=256),
        max_batch=worker_t.integer("max_batch", 8, minimum=1, maximum=1024),
        models_dir=_resolve(Path(worker_t.string("models_dir", "models")), base_dir),
        plan_cache=_resolve(Path(worker_t.string("plan_cache", "var/plans")), base_dir),
        heartbeat_seconds=worker_t.number("heartbeat_seconds", 5.0, minimum=0.05),
        stale_after_seconds=worker_t.number("stale_after_seconds", 60.0, minimum=0.2),
        max_attempts=worker_t.integer("max_attempts", 3, minimum=1, maximum=100),
        series_number_offset=worker_t.integer("series_number_offset", 1000, minimum=0, maximum=2**31 - 1),
        series_description_suffix=worker_t.string("series_description_suffix", " enhanced", pattern=r"[^\\]{0,32}"),
        qa_warning_suffix=worker_t.string("qa_warning_suffix", " QA WARNING", pattern=r"[^\\]{1,24}"),
        qa=_parse_qa(reader.table("qa")),
        max_decoded_mb=worker_t.integer("max_decoded_mb", 4096, minimum=1, maximum=1 << 22),
    )
    if worker.stale_after_seconds <= 2 * worker.heartbeat_seconds:
        raise ConfigError(worker_t.key("stale_after_seconds"), "must be more than twice heartbeat_seconds")
    worker_t.done()
    sender = _parse_sender(reader.table("sender"))
    dash_t = reader.table("dashboard")
    dashboard = DashboardConfig(
        host=dash_t.string("host", "127.0.0.1"),
        port=dash_t.integer("port", 8080, minimum=0, maximum=65535),
        admin_password_hash=os.environ.get(ENV_ADMIN_PASSWORD_HASH) or dash_t.optional_string("admin_password_hash"),
        tls=_parse_tls(dash_t.table("tls"), base_dir, client_ca=False) if dash_t.has("tls") else None,
    )
    _check_ip(dashboard.host, dash_t.key("host"))
    dash_t.done()
    reader.done()
    return Config(node, series, destinations, routes, worker, sender, dashboard, source)


def _parse_node(t: _Table, base_dir: Path) -> NodeConfig:
    allowed = []
    for a in t.tables("allowed"):
        host = a.optional_string("host")
        if host is not None:
            _check_ip(host, a.key("host"))
        allowed.append(AllowedAE(ae_title=_ae_title(a, "ae_title", required=True), host=host))
        a.done()
    _unique([a.ae_title for a in allowed], t.key("allowed"), "ae_title")
    tls = _parse_tls(t.table("tls"), base_dir, client_ca=True) if t.has("tls") else None
    # read from the file (so type-checked) even when the environment overrides them
    storage = t.string("storage_dir", NodeConfig.storage_dir.as_posix())
    storage = os.environ.get(ENV_STORAGE_DIR) or storage
    ledger_url = t.string("ledger_url", NodeConfig.ledger_url)
    ledger_url = os.environ.get(ENV_LEDGER_URL) or ledger_url
    cfg = NodeConfig(
        ae_title=_ae_title(t, "ae_title", default="ENHANCE"),
        host=t.string("host", "0.0.0.0"),
        port=t.integer("port", 11112, minimum=0, maximum=65535),
        storage_dir=_resolve(Path(storage), base_dir),
        ledger_url=_resolve_sqlite_url(ledger_url, base_dir, t.key("ledger_url")),
        max_associations=t.integer("max_associations", 16, minimum=1, maximum=1024),
        min_free_disk_mb=t.integer("min_free_disk_mb", 1024, minimum=0),
        max_pdu_size=t.integer("max_pdu_size", 0, minimum=0),
        network_timeout=t.number("network_timeout", 60.0, minimum=1.0),
        negotiation_timeout=t.number("negotiation_timeout", 5.0, minimum=0.5),
        max_connections_per_host=t.integer("max_connections_per_host", 8, minimum=1, maximum=4096),
        max_inflated_mb=t.integer("max_inflated_mb", 512, minimum=1, maximum=1 << 20),
        receive_processes=t.integer("receive_processes", 0, minimum=0, maximum=64),
        allowed=tuple(allowed),
        tls=tls,
        accept_unknown_sop_classes=t.boolean("accept_unknown_sop_classes", False),
    )
    _check_ip(cfg.host, t.key("host"))
    t.done()
    return cfg


def _parse_tls(tt: _Table, base_dir: Path, *, client_ca: bool) -> TLSConfig:
    ca = tt.optional_string("ca_file") if client_ca else None
    tls = TLSConfig(
        cert_file=_existing_file(tt, "cert_file", base_dir),
        key_file=_existing_file(tt, "key_file", base_dir),
        ca_file=_existing_file(tt, "ca_file", base_dir) if ca is not None else None,
    )
    tt.done()
    return tls


def _parse_destination(t: _Table) -> DestinationConfig:
    d = DestinationConfig(
        name=t.string("name", required=True, pattern=r"[A-Za-z0-9_.-]{1,64}"),
        ae_title=_ae_title(t, "ae_title", required=True),
        host=t.string("host", required=True),
        port=t.integer("port", required=True, minimum=1, maximum=65535),
        max_attempts=t.integer("max_attempts", 8, minimum=1, maximum=1000),
    )
    t.done()
    return d


def _parse_qa(t: _Table) -> QALimits:
    d = QALimits()
    limits = QALimits(
        max_residual_mean_hu=t.number("max_residual_mean_hu", d.max_residual_mean_hu, minimum=0.0),
        max_removed_ratio=t.number("max_removed_ratio", d.max_removed_ratio, minimum=0.0),
        max_edge_ratio=t.number("max_edge_ratio", d.max_edge_ratio, minimum=0.0),
        max_inconsistency_percent=t.number("max_inconsistency_percent", d.max_inconsistency_percent, minimum=0.0),
        max_overshoot_percent=t.number("max_overshoot_percent", d.max_overshoot_percent, minimum=0.0),
    )
    t.done()
    return limits


def _parse_sender(t: _Table) -> SenderConfig:
    cfg = SenderConfig(
        processes=t.integer("processes", 1, minimum=0, maximum=16),
        concurrency=t.integer("concurrency", 4, minimum=1, maximum=64),
        timeout=t.number("timeout", 30.0, minimum=0.5),
        retry_base_seconds=t.number("retry_base_seconds", 10.0, minimum=0.01),
        retry_max_seconds=t.number("retry_max_seconds", 600.0, minimum=0.01),
        heartbeat_seconds=t.number("heartbeat_seconds", 5.0, minimum=0.05),
        stale_after_seconds=t.number("stale_after_seconds", 120.0, minimum=0.2),
    )
    if cfg.retry_max_seconds < cfg.retry_base_seconds:
        raise ConfigError(t.key("retry_max_seconds"), "must be >= retry_base_seconds")
    if cfg.stale_after_seconds <= 2 * cfg.heartbeat_seconds:
        raise ConfigError(t.key("stale_after_seconds"), "must be more than twice heartbeat_seconds")
    t.done()
    return cfg


def _parse_route(t: _Table, destinations: set[str]) -> RouteConfig:
    m = t.table("match")
    match = RouteMatch(
        modality=m.string("modality", "*"),
        calling_ae=m.string("calling_ae", "*"),
        series_description=m.string("series_description", ".*"),
        image_type=tuple(v.strip().upper() for v in m.optional_string_list("image_type")),
        sop_classes=tuple(_sop_class(v, m.key("sop_classes")) for v in m.optional_string_list("sop_classes")),
    )
    try:
        re.compile(match.series_description)
    except re.error as exc:
        raise ConfigError(m.key("series_description"), f"not a regular expression: {exc}") from None
    m.done()
    dests = t.string_list("destinations")
    for name in dests:
        if name not in destinations:
            raise ConfigError(t.key("destinations"), f"no destination named {name!r}")
    r = RouteConfig(
        name=t.string("name", required=True, pattern=r"[A-Za-z0-9_.-]{1,64}"),
        model=t.string("model", required=True, pattern=r"[A-Za-z0-9_.-]{1,64}"),
        destinations=tuple(dests),
        match=match,
        send_back=t.boolean("send_back", False),
        forward_original=t.boolean("forward_original", False),
        strength=t.choice("strength", "high", tuple(STRENGTHS)),
        on_qa_fail=t.choice("on_qa_fail", "fail", QA_POLICIES),
        chain_from=tuple(t.optional_string_list("chain_from")),
    )
    if r.model in r.chain_from:
        raise ConfigError(t.key("chain_from"), f"a model never processes its own output ({r.model!r})")
    if r.forward_original and not (r.destinations or r.send_back):
        raise ConfigError(t.key("forward_original"), "needs destinations or send_back")
    t.done()
    return r


def _sop_class(value: str, key: str) -> str:
    """A SOP Class UID, given as the UID or as its keyword (CTImageStorage)."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) and len(value) <= 64:
        return value
    from pydicom._uid_dict import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == value:
            return uid
    raise ConfigError(key, f"{value!r} is neither a UID nor a SOP class keyword such as CTImageStorage")


def _ae_title(t: _Table, name: str, default: str | None = None, required: bool = False) -> str:
    value = t.string(name, default, required=required)
    if not _AE_CHARS.match(value) or not value.strip():
        raise ConfigError(t.key(name), "must be 1-16 printable characters, no backslash")
    if value != value.strip():
        raise ConfigError(t.key(name), "must not start or end with spaces")
    return value


def _check_ip(value: str, key: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, f"not an IP address: {value!r}") from None


def _existing_file(t: _Table, name: str, base_dir: Path) -> Path:
    path = _resolve(Path(t.string(name, required=True)), base_dir)
    if not path.is_file():
        raise ConfigError(t.key(name), f"file not found: {path}")
    return path


def _resolve(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else base_dir / path


def _resolve_sqlite_url(url: str, base_dir: Path, key: str) -> str:
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", url):
        raise ConfigError(key, "must be a sqlite:/// or postgresql+psycopg:// URL")
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
        return prefix + str(base_dir / url[len(prefix) :])
    return url


def _unique(values: list[str], key: str, field_name: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ConfigError(key, f"duplicate {field_name} {v!r}")
        seen.add(v)


class _Table:
    """Typed, key-naming access to one TOML table; `done()` rejects unknown keys."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def has(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, required: bool) -> Any:
        self._used.add(name)
        if name not in self._data:
            if required:
                raise ConfigError(self.key(name), "is required")
            return None
        return self._data[name]

    def string(
        self, name: str, default: str | None = None, *, required: bool = False, pattern: str | None = None
    ) -> str:
        value = self._get(name, required)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"must be a string, not {type(value).__name__}")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigError(self.key(name), f"{value!r} does not match {pattern}")
        return value

    def optional_string(self, name: str) -> str | None:
        if self._data.get(name) is None:
            self._used.add(name)
            return None
        return self.string(name)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}")
        return value

    def integer(
        self,
        name: str,
        default: int | None = None,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._get(name, required)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, not {value!r}")
        return int(self._bounded(name, value, minimum, maximum))

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, not {value!r}")
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        value = self._get(name, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.key(name), f"must be a number, not {value!r}")
        return float(self._bounded(name, value, minimum, None))

    def _bounded(self, name: str, value: float, lo: float | None, hi: float | None) -> float:
        if lo is not None and value < lo:
            raise ConfigError(self.key(name), f"must be >= {lo}, not {value}")
        if hi is not None and value > hi:
            raise ConfigError(self.key(name), f"must be <= {hi}, not {value}")
        return value

    def string_list(self, name: str) -> list[str]:
        value = self._get(name, True)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), "must be a list of strings")
        return value

    def optional_string_list(self, name: str) -> list[str]:
        if self._data.get(name) is None:
            self._used.add(name)
            return []
        return self.string_list(name)

    def table(self, name: str) -> _Table:
        value = self._get(name, False)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(self.key(name), "must be a table")
        return _Table(value, f"{self.key(name)}.")

    def tables(self, name: str) -> list[_Table]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(self.key(name), f"must be an array of tables ([[{self.key(name)}]])")
        return [_Table(v, f"{self.key(name)}[{i}].") for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")
