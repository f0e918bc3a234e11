"""Runs the dashboard (uvicorn) in a thread of the node's main process, bound to
`dashboard.host:dashboard.port` (port 0: no dashboard)."""

from __future__ import annotations

import logging
import threading

import uvicorn

from node.config import TLSConfig
from node.dashboard.app import Deps, create_app

log = logging.getLogger(__name__)


class DashboardServer:
    def __init__(self, deps: Deps, host: str, port: int, tls: TLSConfig | None = None) -> None:
        config = uvicorn.Config(
            create_app(deps, https_only=tls is not None),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            ssl_certfile=str(tls.cert_file) if tls else None,
            ssl_keyfile=str(tls.key_file) if tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self.where = f"{'https' if tls else 'http'}://{host}:{port}/"

    def start(self) -> None:
        self._thread.start()
        log.info("starting the dashboard on %s", self.where)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
