"""systemd and machined over D-Bus (pystemd). The only module that talks to the bus.

Calls go straight to `DBus.call_method` with explicit signatures: one round trip each,
no introspection. Jobs are waited for on the JobRemoved signal, never by sleeping."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pystemd.dbusexc import (
    DBusAccessDeniedError,
    DBusBaseError,
    DBusInteractiveAuthorizationRequiredError,
)
from pystemd.dbuslib import DBus, DbusMessage, apply_signature, path_encode

from nspawnctl.errors import OperationError
from nspawnctl.log import log

SYSTEMD = b"org.freedesktop.systemd1"
SYSTEMD_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
MACHINED = b"org.freedesktop.machine1"
MACHINED_PATH = b"/org/freedesktop/machine1"
MACHINED_MANAGER = b"org.freedesktop.machine1.Manager"
MACHINE = b"org.freedesktop.machine1.Machine"
NO_SUCH_MACHINE = "org.freedesktop.machine1.NoSuchMachine"
NO_MACHINE_FOR_PID = "org.freedesktop.machine1.NoMachineForPID"

JOB_TIMEOUT = 120.0  # a container's boot is part of its start job (NotifyReady=yes)


@dataclass(frozen=True)
class UnitState:
    name: str
    load: str  # loaded, not-found, masked, ...
    active: str  # active, inactive, failed, activating, deactivating
    sub: str  # listening, running, dead, ...
    job: str = ""  # the type of the job queued for it (start, stop...), "" if none

    def __str__(self) -> str:
        return f"{self.active} ({self.sub})" if self.load == "loaded" else self.load


@dataclass(frozen=True)
class Machine:
    name: str
    leader: int
    state: str  # opening, running, closing
    unit: str


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobError(OperationError):
    """A job that ended otherwise than done; `result` is systemd's word for how
    (failed, canceled, timeout, dependency...)."""

    def __init__(self, result: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


def error_name(err: DBusBaseError) -> str:
    """The D-Bus name of an error: pystemd keeps it in `err_name` for the names it has
    no class of its own for, such as machined's."""
    return text(err.err_name)


def _bus_error(err: DBusBaseError, doing: str) -> OperationError:
    message = text(err.err_message) or str(err)
    hint = None
    if isinstance(err, DBusAccessDeniedError | DBusInteractiveAuthorizationRequiredError):
        hint = "nspawnctl changes the host's systemd: run it as root"
    return OperationError(f"{doing}: {message}", hint=hint)


class Systemd:
    """A connection to the host's system bus."""

    def __init__(self, bus: DBus) -> None:
        self.bus = bus
        self._finished: dict[bytes, str] = {}  # job path -> result, from JobRemoved
        self._subscribed = False

    @classmethod
    @contextmanager
    def connect(cls) -> Iterator[Systemd]:
        bus = DBus()
        try:
            bus.open()
        except DBusBaseError as err:
            raise OperationError(
                f"cannot connect to systemd's system bus: {text(err.err_message) or err}",
                hint="nspawnctl needs a host booted with systemd (see README.md for a test host)",
            ) from None
        try:
            yield cls(bus)
        finally:
            bus.close()

    def _call(
        self,
        dest: bytes,
        path: bytes,
        iface: bytes,
        method: bytes,
        signature: bytes,
        *args: Any,
        doing: str,
        missing: str = "",
    ) -> Any:
        """The reply's body; None if the call fails with the error named `missing` (the
        thing asked about is not there)."""
        encoded = apply_signature(signature, list(args)) if args else []
        return self._call_encoded(dest, path, iface, method, encoded, doing=doing, missing=missing)

    def _call_encoded(
        self,
        dest: bytes,
        path: bytes,
        iface: bytes,
        method: bytes,
        encoded: list[Any],
        *,
        doing: str,
        missing: str = "",
    ) -> Any:
        try:
            reply: DbusMessage = self.bus.call_method(dest, path, iface, method, encoded)
        except DBusBaseError as err:
            if missing and error_name(err) == missing:
                return None
            raise _bus_error(err, doing) from None
        return reply.body

    def _manager(self, method: bytes, signature: bytes, *args: Any, doing: str) -> Any:
        return self._call(SYSTEMD, SYSTEMD_PATH, MANAGER, method, signature, *args, doing=doing)

    def reload(self) -> None:
        """daemon-reload: blocks until systemd has re-read every unit."""
        self._manager(b"Reload", b"", doing="reloading systemd")

    # --- jobs -------------------------------------------------------------------------

    def _subscribe(self) -> None:
        if self._subscribed:
            return
        finished = self._finished

        # pystemd stores metadata on the callback, so it must be a plain function.
        def on_job_removed(msg: DbusMessage, error: Any = None, userdata: Any = None) -> None:
            msg.process_reply(True)
            _id, job, _unit, result = msg.body
            finished[job] = text(result)

        # pystemd keeps only a raw pointer to the callback: without this reference it is
        # garbage-collected and the next signal calls freed memory.
        self._on_job_removed = on_job_removed
        self.bus.match_signal(SYSTEMD, SYSTEMD_PATH, MANAGER, b"JobRemoved", on_job_removed)
        self._manager(b"Subscribe", b"", doing="subscribing to systemd's signals")
        self._subscribed = True

    def _wait_job(self, job: bytes, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while job not in self._finished:
            # process() returns a message object; an empty one means "nothing queued".
            while not self.bus.process().is_empty():
                pass
            if job in self._finished:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise OperationError(f"systemd job {text(job)} did not finish in {timeout:.0f} s")
            select.select([self.bus.get_fd()], [], [], left)
        return self._finished.pop(job)

    def _job(self, method: bytes, unit: str, timeout: float) -> None:
        self._subscribe()
        verb = method.decode().removesuffix("Unit").lower()
        job = self._manager(method, b"ss", unit.encode(), b"replace", doing=f"{verb} {unit}")
        result = self._wait_job(job, timeout)
        if result != "done":
            raise JobError(
                result,
                f"{verb} of {unit} {'failed' if result == 'failed' else 'ended: ' + result}",
                hint=f"see `systemctl status {unit}` and `journalctl -u {unit}`",
            )

    def start(self, unit: str, timeout: float = JOB_TIMEOUT) -> None:
        self._job(b"StartUnit", unit, timeout)

    def stop(self, unit: str, timeout: float = JOB_TIMEOUT) -> None:
        self._job(b"StopUnit", unit, timeout)

    def stop_and_forget(self, unit: str) -> None:
        """Stop a unit and clear a failed state, so that systemd keeps no trace of it once
        its file is gone. Best effort: this runs while undoing or removing."""
        try:
            self.stop(unit)
            self.reset_failed(unit)
        except OperationError as err:
            log.debug("stopping %s: %s", unit, err)

    def freeze(self, unit: str) -> None:
        """Stop every process of a running unit in its tracks (the cgroup freezer); the
        reply comes once they are frozen. Needs the unified cgroup hierarchy."""
        self._manager(b"FreezeUnit", b"s", unit.encode(), doing=f"freezing {unit}")

    def thaw(self, unit: str) -> None:
        """Let a frozen unit's processes run again. A unit that is not frozen needs no
        thaw: one that stopped meanwhile (a stop thaws it), or one that never froze
        (the freeze failed, or the host cannot freeze)."""
        if self.freezer_state(unit) == "running":
            return
        try:
            self._manager(b"ThawUnit", b"s", unit.encode(), doing=f"thawing {unit}")
        except OperationError:
            if self.freezer_state(unit) != "running":  # it did not stop meanwhile
                raise

    def freezer_state(self, unit: str) -> str:
        """running, freezing, frozen or thawing; "running" for a unit that is not loaded."""
        return text(self.unit_property(unit, "FreezerState", "s"))

    def reset_failed(self, unit: str) -> None:
        self._manager(b"ResetFailedUnit", b"s", unit.encode(), doing=f"reset-failed {unit}")

    # --- unit files -------------------------------------------------------------------

    def enable(self, units: Sequence[str]) -> None:
        self._manager(
            b"EnableUnitFiles",
            b"asbb",
            [u.encode() for u in units],
            False,
            False,
            doing="enabling " + " ".join(units),
        )

    def disable(self, units: Sequence[str]) -> None:
        self._manager(
            b"DisableUnitFiles",
            b"asb",
            [u.encode() for u in units],
            False,
            doing="disabling " + " ".join(units),
        )

    def unit_file_state(self, unit: str) -> str:
        try:
            return text(self._manager(b"GetUnitFileState", b"s", unit.encode(), doing=unit))
        except OperationError:
            return "not-found"

    # --- state ------------------------------------------------------------------------

    def states(self, units: Sequence[str]) -> dict[str, UnitState]:
        """States of many units in one call (a thousand containers cost one round trip)."""
        if not units:
            return {}
        rows = self._manager(
            b"ListUnitsByNames", b"as", [u.encode() for u in units], doing="listing units"
        )
        states = [UnitState(*(text(r[i]) for i in (0, 2, 3, 4, 8))) for r in rows]
        return {s.name: s for s in states}

    def loaded_states(self, patterns: Sequence[str]) -> dict[str, UnitState]:
        """States of the units systemd has loaded whose names match `patterns`. Unlike
        `states`, it makes systemd load nothing: a thousand names of containers that
        have no units would cost a thousand failed loads."""
        rows = self._manager(
            b"ListUnitsByPatterns",
            b"asas",
            [],
            [p.encode() for p in patterns],
            doing="listing units",
        )
        states = [UnitState(text(r[0]), text(r[2]), text(r[3]), text(r[4])) for r in rows]
        return {s.name: s for s in states}

    def unit_property(self, unit: str, name: str, signature: str) -> Any:
        path = path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())
        iface = UNIT if name in _UNIT_PROPERTIES else _unit_interface(unit)
        try:
            return self.bus.get_property(SYSTEMD, path, iface, name.encode(), signature.encode())
        except DBusBaseError as err:
            raise _bus_error(err, f"reading {unit} {name}") from None

    def machine(self, name: str) -> Machine | None:
        """The machine machined knows by this name, or None if it is not running."""
        path = self._call(
            MACHINED,
            MACHINED_PATH,
            MACHINED_MANAGER,
            b"GetMachine",
            b"s",
            name.encode(),
            doing=f"asking machined about {name}",
            missing=NO_SUCH_MACHINE,
        )
        if path is None:
            return None

        def prop(prop_name: bytes, signature: bytes) -> Any:
            return self.bus.get_property(MACHINED, path, MACHINE, prop_name, signature)

        try:
            return Machine(
                name,
                int(prop(b"Leader", b"u")),
                text(prop(b"State", b"s")),
                text(prop(b"Unit", b"s")),
            )
        except DBusBaseError:
            return None  # it went away between the two calls

    def machine_of_pid(self, pid: int) -> str | None:
        """The name of the machine that process `pid` (as the host sees it) belongs to;
        None if machined places it in none: a process of the host, or no process."""
        path = self._call(
            MACHINED,
            MACHINED_PATH,
            MACHINED_MANAGER,
            b"GetMachineByPID",
            b"u",
            pid,
            doing=f"asking machined about PID {pid}",
            missing=NO_MACHINE_FOR_PID,
        )
        if path is None:
            return None
        try:
            return text(self.bus.get_property(MACHINED, path, MACHINE, b"Name", b"s"))
        except DBusBaseError:
            return None  # the machine went away between the two calls


_UNIT_PROPERTIES = {
    "ActiveState",
    "SubState",
    "LoadState",
    "ActiveEnterTimestamp",
    "InactiveEnterTimestamp",
    "UnitFileState",
    "Description",
    "FreezerState",
}


def _unit_interface(unit: str) -> bytes:
    kind = unit.rsplit(".", 1)[1].capitalize()
    return f"org.freedesktop.systemd1.{kind}".encode()
