from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.config import (
    AllowedAE,
    Config,
    ConfigError,
    DashboardConfig,
    DestinationConfig,
    NodeConfig,
    QALimits,
    RouteConfig,
    RouteMatch,
    SenderConfig,
    SeriesConfig,
    TLSConfig,
    WorkerConfig,
    load_config,
    parse_config,
)
from node.serve import node_id
from tests.helpers import REPO


def parse(text: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    import tomllib

    return parse_config(tomllib.loads(text), base_dir=tmp_path)


def test_shipped_config_is_valid_and_documented() -> None:
    cfg = load_config(REPO / "config.toml")
    assert cfg.node.ae_title == "ENHANCE"
    assert cfg.node.port == 11112
    assert cfg.node.storage_dir == REPO / "var" / "storage"
    assert cfg.node.ledger_url == f"sqlite:///{REPO}/var/ledger.db"
    assert [(a.ae_title, a.host) for a in cfg.node.allowed] == [("STORESCU", "127.0.0.1")]


def test_embedded_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENHANCE_NODE_CONFIG", raising=False)
    cfg = load_config()
    assert cfg.node.allowed == ()  # refuse all until an admin allows a sender
    assert cfg.series.idle_seconds == 30
    assert cfg.node.storage_dir == tmp_path / "var" / "storage"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"', "node.ae_title"),
        ('[node]\nae_title = ""', "node.ae_title"),
        ('[node]\nae_title = "A\\\\B"', "node.ae_title"),
        ("[node]\nport = 70000", "node.port"),
        ('[node]\nport = "11112"', "node.port"),
        ("[node]\nmax_associations = 0", "node.max_associations"),
        ('[node]\nhost = "example.org"', "node.host"),
        ('[node]\nledger_url = "mysql://x"', "node.ledger_url"),
        ("[node]\nunknown_key = 1", "node.unknown_key"),
        ('[[node.allowed]]\nhost = "127.0.0.1"', "node.allowed[0].ae_title"),
        ('[[node.allowed]]\nae_title = "A"\nhost = "nohost"', "node.allowed[0].host"),
        ('[[node.allowed]]\nae_title = "A"\n[[node.allowed]]\nae_title = "A"', "node.allowed"),
        ('[node.tls]\ncert_file = "missing.pem"\nkey_file = "k"', "node.tls.cert_file"),
        ("[series]\nidle_seconds = -1", "series.idle_seconds"),
        ('[worker]\nbackend = "cuda"', "worker.backend"),
        ('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = ["nowhere"]', "routes[0].destinations"),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nmatch = { series_description = "(" }',
            "routes[0].match.series_description",
        ),
        ('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nsend_back = "yes"', "routes[0].send_back"),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nforward_original = true',
            "routes[0].forward_original",
        ),
        ('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nstrength = "max"', "routes[0].strength"),
        (
            '[[routes]]\nname = "a"\nmodel = "m"\ndestinations = []\n'
            '[[routes]]\nname = "b"\nmodel = "m"\ndestinations = []\nstrength = "max"',
            "routes[1].strength",
        ),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\n'
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []',
            "routes",
        ),
        ('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\non_qa_fail = "ignore"', "routes[0].on_qa_fail"),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nmatch = { sop_classes = ["CTImage"] }',
            "routes[0].match.sop_classes",
        ),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nmatch = { image_type = "AXIAL" }',
            "routes[0].match.image_type",
        ),
        ('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nchain_from = ["m"]', "routes[0].chain_from"),
        ('[node]\naccept_unknown_sop_classes = "yes"', "node.accept_unknown_sop_classes"),
        ("[node]\nnegotiation_timeout = 0.1", "node.negotiation_timeout"),
        ("[node]\nmax_connections_per_host = 0", "node.max_connections_per_host"),
        ("[node]\nmax_connections = 0", "node.max_connections"),
        ("[qa]\nmax_removed_ratio = -1", "qa.max_removed_ratio"),
        ("[qa]\nmax_hu = 3", "qa.max_hu"),
        ('[worker]\nqa_warning_suffix = ""', "worker.qa_warning_suffix"),
        ("[sender]\nprocesses = -1", "sender.processes"),
        ('[dashboard]\nhost = "localhost"', "dashboard.host"),
        ("[dashboard]\nport = 70000", "dashboard.port"),
        ("[sender]\nconcurrency = 0", "sender.concurrency"),
        ("[sender]\nretry_base_seconds = 60\nretry_max_seconds = 10", "sender.retry_max_seconds"),
        ("[sender]\nheartbeat_seconds = 5\nstale_after_seconds = 8", "sender.stale_after_seconds"),
        ("[sender]\nretries = 3", "sender.retries"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "127.0.0.1"\nport = 0', "destinations[0].port"),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\nmax_attempts = 0',
            "destinations[0].max_attempts",
        ),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\n'
            '[[destinations]]\nname = "q"\nae_title = "Q"\nhost = "h"\nport = "104"',
            "destinations[1].port",
        ),
        ("[worker]\nheartbeat_seconds = 5\nstale_after_seconds = 10", "worker.stale_after_seconds"),
        ("[worker]\nqa = { max_edge_ratio = 1 }", "worker.qa"),
        ("[node]\nstorage_dir = 3", "node.storage_dir"),
        ("[dashboard]\nadmin_password_hash = 3", "dashboard.admin_password_hash"),
        ('[node]\nhost_id = "worker/1"', "node.host_id"),  # "/" separates it from the worker's index
        ('[node]\nhost_id = ""', "node.host_id"),
    ],
)
def test_bad_values_name_their_key(text: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    assert info.value.key == key


def test_delivery_options_and_sender_settings(tmp_path: Path) -> None:
    cfg = parse(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.9"\nport = 104\n'
        '[[destinations]]\nname = "ct01"\nae_title = "CT01"\nhost = "10.0.0.5"\nport = 104\nmax_attempts = 2\n'
        '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = ["pacs"]\nsend_back = true\nforward_original = true\n'
        "[sender]\nconcurrency = 2\nretry_base_seconds = 1.5",
        tmp_path,
    )
    route = cfg.routes[0]
    assert (route.send_back, route.forward_original, route.destinations) == (True, True, ("pacs",))
    assert (cfg.sender.concurrency, cfg.sender.retry_base_seconds, cfg.sender.processes) == (2, 1.5, 1)
    assert [(d.name, d.ae_title, d.max_attempts) for d in cfg.destinations][1] == ("ct01", "CT01", 2)
    assert cfg.destinations[0].max_attempts == 8  # DESIGN 3.2's default


def test_env_overrides_paths_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENHANCE_NODE_STORAGE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("ENHANCE_NODE_LEDGER_URL", "sqlite:////tmp/x.db")
    cfg = parse('[node]\nstorage_dir = "s"', tmp_path)
    assert cfg.node.storage_dir == tmp_path / "elsewhere"
    assert cfg.node.ledger_url == "sqlite:////tmp/x.db"


def test_each_process_may_be_given_its_own_host_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several workers or senders on one host sharing one config.toml: the environment names
    each (a systemd template unit's instance); without either, hostname:port."""
    monkeypatch.delenv("ENHANCE_NODE_HOST_ID", raising=False)
    assert node_id(parse("[node]\nport = 104", tmp_path)) == f"{socket.gethostname()}:104"
    assert node_id(parse('[node]\nhost_id = "gpu-1.worker-a"', tmp_path)) == "gpu-1.worker-a"
    monkeypatch.setenv("ENHANCE_NODE_HOST_ID", "gpu-1:worker-b")
    assert node_id(parse('[node]\nhost_id = "gpu-1.worker-a"', tmp_path)) == "gpu-1:worker-b"
    monkeypatch.setenv("ENHANCE_NODE_HOST_ID", "gpu 1")
    with pytest.raises(ConfigError) as info:
        parse("", tmp_path)
    assert info.value.key == "node.host_id"


def test_cli_bad_config_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[node]\nport = 99999\n")
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(bad), "serve"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "node.port" in lines[0], result.stderr


@pytest.mark.parametrize(
    "form",
    [
        ["--config", "{cfg}", "serve"],
        ["serve", "--config", "{cfg}"],  # DESIGN 3.1's form
        ["serve", "--config={cfg}", "--log-format", "json"],
    ],
)
def test_global_options_may_come_before_or_after_the_subcommand(tmp_path: Path, form: list[str]) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[node]\nport = 99999\n")
    args = [a.format(cfg=bad) for a in form]
    result = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "node.port" in result.stderr, (
        result.stderr
    )  # the file was read: not a usage error


def test_globals_first_moves_only_the_global_options() -> None:
    from node.cli import globals_first

    assert globals_first(["ae", "add", "CT01", "--host", "10.0.0.5", "--config", "c.toml"]) == [
        "--config",
        "c.toml",
        "ae",
        "add",
        "CT01",
        "--host",
        "10.0.0.5",
    ]
    assert globals_first(["jobs", "list", "--log-level=DEBUG"]) == ["--log-level=DEBUG", "jobs", "list"]
    assert globals_first(["train", "--", "--config", "x"]) == ["train", "--", "--config", "x"]


def test_cli_bad_usage_exits_2_with_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "node.cli", "frobnicate"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_ae_add_list_remove_keeps_comments(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('# my site\n[node]\nae_title = "ENHANCE"  # keep me\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(cfg), "ae", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    assert run("add", "CT01", "--host", "10.0.0.5").returncode == 0
    assert run("add", "MR01").returncode == 0
    listed = run("list").stdout
    assert "CT01" in listed and "10.0.0.5" in listed and "MR01" in listed
    dup = run("add", "CT01")
    assert dup.returncode == 2 and "already" in dup.stderr
    bad = run("add", "TOO_LONG_FOR_AN_AE_TITLE")
    assert bad.returncode == 2 and "ae_title" in bad.stderr
    assert run("remove", "CT01").returncode == 0
    text = cfg.read_text()
    assert "# my site" in text and "# keep me" in text
    assert "CT01" not in text and "MR01" in text
    assert run("remove", "CT01").returncode == 2


def test_route_strength_policy_and_qa_limits(tmp_path: Path) -> None:
    cfg = parse(
        '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []\nstrength = "low"\n'
        'on_qa_fail = "deliver-with-warning"\n'
        "[qa]\nmax_residual_mean_hu = 4\nmax_overshoot_percent = 1.5",
        tmp_path,
    )
    route = cfg.routes[0]
    assert (route.strength, route.on_qa_fail) == ("low", "deliver-with-warning")
    assert cfg.worker.qa.max_residual_mean_hu == 4.0 and cfg.worker.qa.max_overshoot_percent == 1.5
    assert cfg.worker.qa.max_removed_ratio == 2.0  # left out: the default
    defaults = parse('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []', tmp_path).routes[0]
    assert (defaults.strength, defaults.on_qa_fail) == ("high", "fail")


def test_route_image_type_sop_classes_and_chain(tmp_path: Path) -> None:
    cfg = parse(
        "[node]\naccept_unknown_sop_classes = true\n"
        '[[routes]]\nname = "r"\nmodel = "ct-sr2"\ndestinations = []\nchain_from = ["ct-denoise"]\n'
        'match = { image_type = ["original", "AXIAL"], sop_classes = ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.2.1"]'
        " }",
        tmp_path,
    )
    route = cfg.routes[0]
    assert route.match.image_type == ("ORIGINAL", "AXIAL")
    assert route.match.sop_classes == ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
    assert route.chain_from == ("ct-denoise",)
    assert cfg.node.accept_unknown_sop_classes
    defaults = parse('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = []', tmp_path)
    assert (defaults.routes[0].match.image_type, defaults.routes[0].match.sop_classes) == ((), ())
    assert defaults.routes[0].chain_from == () and not defaults.node.accept_unknown_sop_classes


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: NodeConfig(port=70000), "node.port"),
        (lambda: NodeConfig(ae_title="A\\B"), "node.ae_title"),
        (lambda: NodeConfig(host="example.org"), "node.host"),
        (lambda: NodeConfig(ledger_url="mysql://x"), "node.ledger_url"),
        (lambda: NodeConfig(storage_dir="var/storage"), "node.storage_dir"),  # a str, not a Path
        (lambda: NodeConfig(allowed=(AllowedAE("A"), AllowedAE("A"))), "node.allowed"),
        (lambda: NodeConfig(accept_unknown_sop_classes=1), "node.accept_unknown_sop_classes"),
        (lambda: AllowedAE(""), "node.allowed.ae_title"),
        (lambda: AllowedAE("A", host="nohost"), "node.allowed.host"),
        (lambda: TLSConfig("cert.pem", Path("key.pem")), "tls.cert_file"),
        (lambda: SeriesConfig(idle_seconds=-1), "series.idle_seconds"),
        (lambda: DestinationConfig("p", "P", "127.0.0.1", 0), "destinations.port"),
        (lambda: DestinationConfig("no spaces", "P", "127.0.0.1", 104), "destinations.name"),
        (lambda: DestinationConfig("p", "P", "127.0.0.1", 104, max_attempts=True), "destinations.max_attempts"),
        (lambda: RouteMatch(series_description="("), "routes.match.series_description"),
        (lambda: RouteMatch(image_type=["AXIAL"]), "routes.match.image_type"),  # a list, not a tuple
        (lambda: RouteConfig("r", "m", (), strength="max"), "routes.strength"),
        (lambda: RouteConfig("r", "m", (), on_qa_fail="ignore"), "routes.on_qa_fail"),
        (lambda: RouteConfig("r", "m", (), chain_from=("m",)), "routes.chain_from"),
        (lambda: RouteConfig("r", "m", (), forward_original=True), "routes.forward_original"),
        (lambda: QALimits(max_removed_ratio=-1), "qa.max_removed_ratio"),
        (lambda: WorkerConfig(backend="cuda"), "worker.backend"),
        (lambda: WorkerConfig(device="gpu"), "worker.device"),
        (lambda: WorkerConfig(qa_warning_suffix=""), "worker.qa_warning_suffix"),
        (lambda: WorkerConfig(heartbeat_seconds=5, stale_after_seconds=10), "worker.stale_after_seconds"),
        (lambda: SenderConfig(concurrency=0), "sender.concurrency"),
        (lambda: SenderConfig(heartbeat_seconds=5, stale_after_seconds=8), "sender.stale_after_seconds"),
        (lambda: DashboardConfig(host="localhost"), "dashboard.host"),
        (lambda: DashboardConfig(port="8080"), "dashboard.port"),
        (lambda: Config(routes=(RouteConfig("r", "m", ("nowhere",)),)), "routes[0].destinations"),
        (lambda: Config(destinations=(DestinationConfig("p", "P", "h", 1),) * 2), "destinations"),
        (lambda: Config(worker=SenderConfig()), "worker"),
    ],
)
def test_config_objects_built_in_code_check_themselves(build: Callable[[], object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key


def test_an_object_built_in_code_fails_as_the_file_does(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as in_code:
        SenderConfig(retry_base_seconds=10, retry_max_seconds=1)
    with pytest.raises(ConfigError) as in_file:
        parse("[sender]\nretry_base_seconds = 10\nretry_max_seconds = 1", tmp_path)
    assert str(in_code.value) == str(in_file.value) == "sender.retry_max_seconds: must be >= retry_base_seconds"
    assert SenderConfig(retry_base_seconds=10).retry_base_seconds == 10.0  # a float setting holds a float
    assert type(SenderConfig(retry_base_seconds=10).retry_base_seconds) is float


def _same_fields(parsed: Any, default: Any, base_dir: Path) -> None:
    """Field by field, `parsed` holds `default`'s values, its relative paths resolved against base_dir."""
    assert type(parsed) is type(default)
    for f in dataclasses.fields(default):
        want = getattr(default, f.name)
        if isinstance(want, Path):
            want = base_dir / want
        if f.name == "ledger_url":
            want = want.replace("sqlite:///", f"sqlite:///{base_dir}/")
        assert getattr(parsed, f.name) == want, f.name


@pytest.fixture
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in (
        "ENHANCE_NODE_STORAGE_DIR",
        "ENHANCE_NODE_LEDGER_URL",
        "ENHANCE_NODE_ADMIN_PASSWORD_HASH",
        "ENHANCE_NODE_HOST_ID",
    ):
        monkeypatch.delenv(env, raising=False)


@pytest.mark.usefixtures("no_env_overrides")
def test_an_empty_file_gives_the_dataclass_defaults(tmp_path: Path) -> None:
    """The defaults are written once, on the dataclass fields: the reader has none of its own."""
    cfg = parse("", tmp_path)
    _same_fields(cfg.node, NodeConfig(), tmp_path)
    _same_fields(cfg.series, SeriesConfig(), tmp_path)
    _same_fields(cfg.worker, WorkerConfig(), tmp_path)
    _same_fields(cfg.worker.qa, QALimits(), tmp_path)
    _same_fields(cfg.sender, SenderConfig(), tmp_path)
    _same_fields(cfg.dashboard, DashboardConfig(), tmp_path)
    assert (cfg.destinations, cfg.routes, cfg.node.allowed) == ((), (), ())
    assert cfg.source is None
    sections = ["node", "series", "destinations", "routes", "worker", "sender", "dashboard", "source"]
    assert [f.name for f in dataclasses.fields(Config)] == sections  # a new one: compare it above
    # tables in arrays: only their required keys given, the rest their fields' defaults
    arrays = parse(
        '[[node.allowed]]\nae_title = "CT01"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
        '[[routes]]\nname = "r"\nmodel = "m"\ndestinations = ["pacs"]',
        tmp_path,
    )
    _same_fields(arrays.node.allowed[0], AllowedAE("CT01"), tmp_path)
    _same_fields(arrays.destinations[0], DestinationConfig("pacs", "PACS", "h", 104), tmp_path)
    _same_fields(arrays.routes[0], RouteConfig("r", "m", ("pacs",)), tmp_path)
    _same_fields(arrays.routes[0].match, RouteMatch(), tmp_path)


@pytest.mark.usefixtures("no_env_overrides")
def test_the_shipped_config_shows_the_defaults() -> None:
    """config.toml says its values are the defaults unless marked example: it must not drift."""
    shipped = load_config(REPO / "config.toml")
    defaults = parse_config({}, base_dir=REPO)
    assert dataclasses.replace(shipped.node, allowed=()) == defaults.node  # its allowed AE is an example
    assert (shipped.series, shipped.worker, shipped.sender, shipped.dashboard) == (
        defaults.series,
        defaults.worker,
        defaults.sender,
        defaults.dashboard,
    )
