"""Run a connection manager inside the current process, in a thread with its own trio loop.

Used by ``connmgr demo``, the tests and the labs: the caller keeps using blocking clients
(psql, pgbench, psycopg) while connmgr serves, and can read its :class:`~connmgr.app.App`
(metrics, registry). :meth:`EmbeddedConnmgr.stop` shuts it down gracefully and re-raises
whatever crashed its loop.
"""

from __future__ import annotations

import threading

import trio

from .app import App
from .config import Config


class EmbeddedConnmgr:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = App(config)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._main, name="connmgr", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: self.app.serve(handle_signals=False, task_status=task_status)
                )
                self._started.set()

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - re-raised by start()/stop()
            self._error = e
        finally:
            self._started.set()

    def start(self, timeout: float = 30) -> EmbeddedConnmgr:
        """Start serving; returns self once listening. Raises what prevented it."""
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise self._error
        return self

    @property
    def host(self) -> str:
        return self.app.listen_addresses[0][0]

    @property
    def port(self) -> int:
        return self.app.listen_addresses[0][1]

    def conninfo(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None, **extra: str) -> str:
        """A libpq connection string that reaches the backend through this connmgr."""
        parts = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname}
        if password is not None:
            parts["password"] = password
        parts.update(extra)
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def run_sync(self, fn, *args):
        """Run ``fn(*args)`` on connmgr's trio thread and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown; waits for the loop to end and re-raises its crash, if any."""
        if self._thread.is_alive() and self._token is not None:
            try:
                self.run_sync(self.app.shutdown)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"connmgr did not stop within {timeout}s")
        if self._error is not None:
            raise self._error
