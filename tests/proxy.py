"""A TCP proxy a test puts between trimperor and a server, to cut the line."""

from __future__ import annotations

import contextlib
import socket

import trio

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to a target; ``cut()`` drops every
    connection and refuses new ones, ``restore()`` accepts again.

    Use ``port = await nursery.start(proxy.run)``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._cut = False
        self._scopes: set[trio.CancelScope] = set()
        self._listener: trio.SocketListener | None = None
        self._restored = trio.Event()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self.port)
            while True:
                stream = await listener.accept()
                if self._cut:
                    await stream.aclose()
                    continue
                nursery.start_soon(self._pipe, stream)

    async def _pipe(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                await client.aclose()
                return
            except BaseException:  # cut while connecting to the target
                client.socket.close()
                raise
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, client, server, nursery.cancel_scope)
                nursery.start_soon(self._copy, server, client, nursery.cancel_scope)
        self._scopes.discard(scope)

    @staticmethod
    async def _copy(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        done.cancel()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self._cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self._cut = False
