"""The web dashboard: server-rendered pages for admins and physicists, /metrics for
Prometheus, /healthz and /readyz for the service manager."""
