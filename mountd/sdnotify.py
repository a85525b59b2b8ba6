"""The systemd readiness protocol (sd_notify), both sides: tell a supervisor, or be one.

A daemon started by systemd with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in its
environment and sends one datagram such as ``READY=1\\nSTATUS=...`` to that unix
socket when it is ready (sd_notify(3)). The mount helper plays systemd's part
for a daemon it starts itself: it binds a socket, passes its path in
``NOTIFY_SOCKET`` and waits for ``READY=1``.

The protocol is one datagram on a unix socket, so this is written here rather
than depending on ``systemd-python`` (a C extension that needs libsystemd's
headers to build) or an unmaintained pure-Python package.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

ENV = "NOTIFY_SOCKET"


def _address(path: str) -> str:
    # "@name" is a socket in the abstract namespace (a leading NUL byte).
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the supervisor, if any.

    Returns whether a supervisor was told. Without ``$NOTIFY_SOCKET`` (not run by
    systemd or by the mount helper) this does nothing; a supervisor that went away
    is not an error of the daemon's.
    """
    path = os.environ.get(ENV)
    if not path or not (path.startswith("/") or path.startswith("@")):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), _address(path))
        except OSError:
            return False
    return True


def ready(status: str) -> bool:
    """Tell the supervisor that the daemon is ready, with a one-line ``status``."""
    return notify(f"READY=1\nSTATUS={status.replace(chr(10), ' ')}")


class Listener:
    """The supervisor's side: a notify socket in a private directory, and its messages.

    Use as a context manager; pass ``env()`` to the child and ``receive()`` what it sends.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="dfs-notify-")
        self.path = Path(self._dir.name) / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self.path))

    def env(self) -> dict[str, str]:
        return {ENV: str(self.path)}

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message as ``KEY -> value``, or None if none came within ``timeout`` s."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(4096)
        except TimeoutError:
            return None
        fields: dict[str, str] = {}
        for line in data.decode(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        return fields

    def close(self) -> None:
        self._sock.close()
        self._dir.cleanup()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
