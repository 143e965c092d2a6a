"""libnftables in-process (ctypes): the `nft` command without a process per batch.

Why: every `nft` process pays its start (~2 ms) and, when its batch deleted anything,
about 10-12 ms more when it exits: closing an nf_tables netlink socket waits for the
deferred release of deleted objects (an RCU grace period). The commit itself does not
wait. One long-lived context per natports process keeps one socket open, so a batch
costs its commit only; the wait moves to the process's exit (or off the path entirely
in a long-lived process such as `natports watch`). docs/performance.md has the numbers.

Thin on purpose: the same batch text as `nft -f -`, the same output text as `nft`.
`load()` returns None when the library is missing: the caller then runs the `nft`
binary, as before (NftBackend also does with NATPORTS_NFT=binary).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

SONAME = "libnftables.so.1"  # Debian's libnftables1, which the nftables package pulls in
OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON (nftables/libnftables.h)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: str
    error: str


class LibNft:
    """One nft context (and its netlink socket) for the life of the process."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._lock = threading.Lock()  # a context is not safe for concurrent use
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise OSError("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise OSError("nft_ctx_buffer_output failed")
        self._ctx = ctx

    def run(self, text: str, json_output: bool = False) -> Outcome:
        """Run nft commands (the text of `nft -f -`, or one command line)."""
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return Outcome(rc == 0, out.decode(errors="replace"), err.decode(errors="replace"))


_shared: LibNft | None = None
_tried = False
_guard = threading.Lock()


def load() -> LibNft | None:
    """The process's context, or None when the library cannot be loaded."""
    global _shared, _tried
    with _guard:
        if not _tried:
            _tried = True
            try:
                _shared = LibNft(ctypes.CDLL(SONAME))
            except (OSError, AttributeError):
                _shared = None  # missing library or symbols: the nft binary does the work
        return _shared
