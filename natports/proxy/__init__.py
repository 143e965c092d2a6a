"""The userspace TCP/UDP proxy: natports' fallback where netfilter cannot be programmed.

`serve(state_dir, config_path)` runs the daemon (`natports proxy`);
natports.backends.proxy.ProxyBackend writes its config and reloads it.
"""

from __future__ import annotations

from .config import config_path, route_id, socket_path
from .daemon import serve

__all__ = ["config_path", "route_id", "serve", "socket_path"]
