"""The userspace TCP/UDP proxy: natports' fallback where netfilter cannot be programmed.

`natports.proxy.daemon.serve(state_dir, config_path)` runs the daemon (`natports proxy`);
natports.backends.proxy.ProxyBackend writes its config and reloads it. This package
imports none of its modules: only `natports proxy` loads the daemon's, and every other
natports command starts without them.
"""
