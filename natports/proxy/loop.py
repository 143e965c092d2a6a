"""The event loop: one epoll, one thread, a queue of work that yielded, and rate-limited logs.

One thread does everything, so the state a restart hands over is always
consistent: between two events no syscall is half done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("natports.proxy")

IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
EDGE = IN | OUT | select.EPOLLET  # connection sockets: registered once, never modified

Handler = Callable[[int], None]
Task = Callable[[], None]


class Loop:
    """epoll plus a queue of tasks that still had work when they yielded (fairness)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.ready: deque[Task] = deque()
        self.now = time.monotonic()  # refreshed once per round: cheap idle bookkeeping

    def add(self, fd: int, handler: Handler, mask: int) -> None:
        self.epoll.register(fd, mask)
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """For an fd about to be closed: closing it leaves the epoll set by itself.

        Saves an epoll_ctl per socket per connection. The proxy's sockets are never
        duplicated (no dup, no fork without exec), so close() drops the last
        reference and with it the registration; an event already fetched for the
        number finds no handler, or a new owner that checks its state.
        """
        self.handlers.pop(fd, None)

    def poll(self, timeout: float) -> None:
        if self.ready:
            timeout = 0
        events = self.epoll.poll(timeout)
        self.now = time.monotonic()
        for fd, mask in events:
            handler = self.handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(mask)
            except Exception:  # a bug in one flow must not take every other flow down
                log.exception("internal error on fd %d", fd)
        for _ in range(len(self.ready)):
            task = self.ready.popleft()
            try:
                task()
            except Exception:
                log.exception("internal error in a queued task")


class Warnings:
    """At most one line per topic every `every` seconds: a dead backend must not flood."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def warn(self, topic: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(topic, -1e9) >= self.every:
            self._last[topic] = now
            log.warning("%s", message)


def setup_logging(name: str = "natports-proxy") -> None:
    """Log lines to stderr (the journal under systemd), level from NATPORTS_PROXY_LOG."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{name}: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(os.environ.get("NATPORTS_PROXY_LOG", "INFO").upper())
