"""The userspace TCP/UDP proxy: natports' fallback where netfilter cannot be programmed.

`natports.proxy.daemon.serve(state_dir, config_path)` runs the daemon (`natports proxy`);
natports.backends.proxy.ProxyBackend writes its config and reloads it. This package
imports no submodule itself: the daemon's modules load only in the process that serves,
not in every CLI run that reads the proxy's config path.
"""
