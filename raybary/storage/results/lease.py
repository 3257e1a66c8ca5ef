"""One run per OUTPUT: :class:`OutputLease`, held by a run's driver.

The lease is ``OUT/_lease.json``: the run id, host, pid and a heartbeat the
driver refreshes every ``LEASE_HEARTBEAT_S``. Works alike on local disks and
object stores (no locks, one small object). It lives on the driver only;
actors commit through a :class:`~raybary.storage.results.commit.ShardCommitter`,
which knows nothing of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
import warnings
from collections.abc import Mapping
from typing import Any

from raybary.storage import _fs
from raybary.storage.errors import ResultsConflictError
from raybary.storage.options import StorageOptions
from raybary.storage.results.layout import (
    LEASE_FILE,
    LEASE_SETTLE_S,
    LEASE_STALE_S,
    is_foreign,
    now_iso,
    pid_alive,
    read_lease,
    run_tmp,
)

__all__ = ["OutputLease"]


class OutputLease:
    """The lease of run ``run_id`` on the results directory ``url`` (opened
    with ``storage_options``).

    :attr:`held` says whether this run holds it (after :meth:`acquire`,
    until :meth:`release` or another run took it over).
    """

    def __init__(self, url: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.url, self.run_id = url, run_id
        self.storage_options = StorageOptions.of(storage_options)
        self.held = False

    def _paths(self):
        return _fs.url_to_fs(self.url, self.storage_options)

    def acquire(self) -> None:
        """Take the lease, before the directory is prepared.

        Another run's lease with a heartbeat younger than ``LEASE_STALE_S``
        raises :class:`ResultsConflictError`; an older one, or one whose
        driver ran on this machine and has exited, is taken over (its run is
        presumed dead). Where there is no lease, it is created with a
        conditional write (:func:`~raybary.storage._fs.write_bytes_exclusive`:
        of two runs creating it at once, one gets "exists" and gives up).
        Either way the lease is read back after a moment: of two runs that
        both wrote (a take-over, or a store without conditional writes), the
        one that reads another id gives up. A folder that is not raybary
        results is left alone (the writer's ``prepare`` refuses it)."""
        fs, root = self._paths()
        if fs.exists(root) and is_foreign(fs, root):
            return
        held = read_lease(fs, root)
        if held is not None and held.get("run_id") != self.run_id:
            self._take_over(held)
        if held is None:
            if not self._create(fs, root):  # another run created it since: refused
                self._take_over(read_lease(fs, root) or {"run_id": "?", "heartbeat": time.time()})
                self._write(fs, root)  # (only if that lease is already a dead run's)
        else:
            self._write(fs, root)
        time.sleep(LEASE_SETTLE_S)
        now = read_lease(fs, root)
        if now is None or now.get("run_id") != self.run_id:
            raise ResultsConflictError(
                f"another run (run {None if now is None else now.get('run_id')}) took "
                f"{self.url} at the same moment; wait for it or write to another OUTPUT")
        self.held = True

    def _take_over(self, held: dict) -> None:
        """Refuse a live run's lease; warn when taking over a dead one's."""
        age = time.time() - float(held.get("heartbeat", 0.0))
        if held.get("host") == socket.gethostname() and not pid_alive(held.get("pid")):
            age = max(age, LEASE_STALE_S)  # its driver ran on this machine and has exited
        if age < LEASE_STALE_S:
            raise ResultsConflictError(
                f"another run is writing {self.url}: run {held.get('run_id')} on "
                f"{held.get('host')} (pid {held.get('pid')}), last heartbeat {age:.0f} s "
                f"ago. Wait for it to finish or stop it (a lease without a heartbeat for "
                f"{LEASE_STALE_S:.0f} s is taken over), or write to another OUTPUT."
            )
        warnings.warn(f"taking over {self.url} from run {held.get('run_id')}, whose last "
                      f"heartbeat was {age:.0f} s ago", stacklevel=3)

    def heartbeat(self) -> bool:
        """Refresh the lease (every ``LEASE_HEARTBEAT_S``); ``False`` if another
        run has taken it over (this one should stop writing)."""
        if not self.held:
            return True
        fs, root = self._paths()
        held = read_lease(fs, root)
        if held is not None and held.get("run_id") != self.run_id:
            self.held = False
            return False
        self._write(fs, root)
        return True

    def rewrite(self) -> None:
        """Write the lease again if held (the directory was replaced under it)."""
        if self.held:
            self._write(*self._paths())

    def release(self) -> None:
        """Give the lease back (at the end, whatever happened)."""
        if not self.held:
            return
        self.held = False
        fs, root = self._paths()
        held = read_lease(fs, root)
        if held is not None and held.get("run_id") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(posixpath.join(root, LEASE_FILE))

    def _lease(self) -> dict:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time(), "written": now_iso()}

    def _write(self, fs, root: str) -> None:
        _fs.write_json_atomic(fs, posixpath.join(root, LEASE_FILE), self._lease(),
                              run_tmp(root, self.run_id))

    def _create(self, fs, root: str) -> bool:
        """Create the lease where there is none; ``False`` if one appeared meanwhile."""
        data = json.dumps(self._lease(), indent=2, sort_keys=True).encode()
        return _fs.write_bytes_exclusive(fs, posixpath.join(root, LEASE_FILE), data,
                                         run_tmp(root, self.run_id))
