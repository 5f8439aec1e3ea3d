"""What both store-cluster launchers share: a master and a pool holder as killable processes.

:class:`~mooncake_connector.testing.store_cluster.StoreCluster` (ours) and
:class:`~mooncake_connector.testing.mooncake_cluster.MooncakeCluster` (the real Mooncake) start
different programs but are stopped, killed and logged the same way, so fault tests can run
against either store.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

from transfer.testing import stop_process

__all__ = ["MasterAndHolder"]


@dataclass
class MasterAndHolder:
    """Owns the two processes and their log files; subclasses start them."""

    _master: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _holder: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _logs: list[Any] = field(default_factory=list, init=False, repr=False)

    def start(self, timeout: float = 30.0) -> Any:
        raise NotImplementedError

    def kill_master(self) -> None:
        """SIGKILL the master: clients' calls must then fail cleanly (no hang, no crash)."""
        if self._master is not None:
            self._master.kill()
            self._master.wait(10)

    def kill_holder(self) -> None:
        """SIGKILL the process holding the pool: every stored block vanishes with it."""
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait(10)

    def stop(self) -> None:
        for proc in (self._holder, self._master):
            if proc is not None:
                stop_process(proc, timeout=5)
        self._holder = self._master = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
