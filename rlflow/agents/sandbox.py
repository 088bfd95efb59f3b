"""Run untrusted Python in a separate, confined process.

``run_python(code)`` runs ``code`` with the same interpreter (``sys.executable -I -B``) in
a private temporary directory, removed afterwards, with a minimal environment (no
inherited variables, hence no secrets). The boundaries, strongest first:

- **Process limits** (``setrlimit``): CPU seconds, address space, size of written files,
  number of processes, open files, no core files. A wall-clock deadline on top.
- **Process group**: the code leads its own session; on timeout, on too much output and
  when the code ends, the whole group is killed, so children it left running go too.
- **Own uid** (when this process is root): the code runs as an unprivileged uid of its
  own, so the process limit holds (root ignores it), files outside its directory are
  not writable except in world-writable places such as /tmp, and after the run every
  process of that uid is killed, including those that left the process group with
  ``setsid``. Each run gets a different uid, so concurrent runs do not share their
  process limit or see each other's files.
- **No network** when the kernel allows a new network namespace (root, or an
  unprivileged user namespace): nothing is reachable, not even 127.0.0.1. Where it is
  refused, only the guard below stands between the code and the network.
- **Guard**: an audit hook in the child refuses starting programs, forking, socket
  connections, name lookups and writes outside the directory, with status ``"blocked"``.
  It is defense in depth: ``ctypes`` calls libc past it, so the limits above are the
  real boundary.

``SandboxResult.isolation`` says which of ``netns``, ``uid``, ``rlimits`` and ``guard``
took effect on this machine. See :mod:`rlflow.agents.sandbox_child` for the child side.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

from rlflow.agents import sandbox_child

Status = Literal["ok", "error", "timeout", "memory", "output_limit", "blocked"]

_CHILD_SCRIPT = os.path.abspath(sandbox_child.__file__)
_READ_CHUNK = 65536
_DRAIN_GRACE_S = 0.5
_POLL_S = 0.05
# Per-run uids start here, far above the ranges that distributions give to accounts.
_UID_BASE = 1 << 30
_NOBODY = 65534
_runs = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the code it runs)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resources one run may use. CPU time is rounded up to whole seconds."""

    cpu_time_s: float = 5.0
    wall_time_s: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 65536  # per stream; more ends the run with "output_limit"
    max_processes: int = 32  # threads count too
    max_file_bytes: int = 1 << 20
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended.

    ``status``: ``ok`` (exit status 0), ``error`` (non-zero exit or an uncaught exception),
    ``timeout`` (wall clock or CPU time), ``memory`` (ran out of its address space),
    ``output_limit`` (wrote more than ``max_output_bytes`` to a stream), ``blocked`` (the
    guard refused an operation). ``returncode`` is negative for a signal, None if the
    process could not be waited for. ``stdout``/``stderr`` are cut at the output limit.
    """

    status: Status
    returncode: Optional[int]
    stdout: str
    stderr: str
    wall_s: float
    isolation: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(
    code: str,
    *,
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
    guard: bool = True,
) -> SandboxResult:
    """Run ``code`` in a confined child process and report how it ended.

    ``stdin`` is the child's standard input. ``guard=False`` leaves out the audit-hook
    guard so that the operating-system limits can be tested on their own. Raises
    ``SandboxError`` when the child could not confine itself (nothing of ``code`` ran).
    """
    if not sys.executable:
        raise SandboxError("sys.executable is unknown: no interpreter to run the code with")
    workdir = tempfile.mkdtemp(prefix="rlflow-sandbox-")
    proc: Optional[subprocess.Popen] = None
    ids: Optional[tuple[int, int]] = None
    sweep_uid: Optional[int] = None  # a uid that only this run uses
    status_r = status_w = -1
    try:
        os.chmod(workdir, 0o700)
        code_path = os.path.join(workdir, "main.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        ids = _sandbox_ids(workdir)
        if ids is not None and ids[0] != _NOBODY:
            sweep_uid = ids[0]
        status_r, status_w = os.pipe()
        config = {
            "workdir": workdir,
            "code_path": code_path,
            "limits": asdict(limits),
            "uid": ids[0] if ids else None,
            "gid": ids[1] if ids else None,
            "guard": guard,
            "status_fd": status_w,
            "parent_pid": os.getpid(),
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", _CHILD_SCRIPT, json.dumps(config)],
                cwd=workdir,
                env=_child_env(workdir),
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,),
                start_new_session=True,
            )
        os.close(status_w)
        status_w = -1
        stdout, stderr, stopped = _collect(proc, limits, start + limits.wall_time_s, sweep_uid)
        returncode = proc.wait()
        wall_s = time.monotonic() - start
        report = _read_report(status_r)
        if report is None and stopped is None:
            detail = stderr[-2000:].decode(errors="replace")
            raise SandboxError(f"the sandbox could not confine its child: {detail}")
        return SandboxResult(
            status=_status(stopped, returncode, stderr),
            returncode=returncode,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            wall_s=wall_s,
            isolation=_isolation(report),
        )
    finally:
        # Also reached when an exception (a reward time limit's alarm, say) interrupts the
        # run: nothing of it may outlive this call.
        if proc is not None:
            _kill_all(proc.pid, sweep_uid)
            if proc.returncode is None:
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """Remove the run's directory, even where the code took away its own permissions (which
    only matters when this process is not root). Symbolic links are never followed."""
    if os.geteuid() != 0:
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    try:
                        os.chmod(sub, 0o700)
                    except OSError:
                        pass
    shutil.rmtree(path, ignore_errors=True)


def _sandbox_ids(workdir: str) -> Optional[tuple[int, int]]:
    """The uid and gid the child switches to, with ``workdir`` handed over to them; None
    when this process is not root (the child then keeps this process's uid).

    A run's uid is derived from this process's pid and a run counter, so runs of one
    process never share one, and runs of two processes only when their pids agree in the
    low 20 bits. If the kernel cannot represent it (a user namespace with a short uid map),
    ``nobody`` is used instead, which is shared and so never swept by uid.
    """
    if os.geteuid() != 0:
        return None
    slot = ((os.getpid() & 0xFFFFF) << 9) | (next(_runs) & 0x1FF)
    for uid in (_UID_BASE + slot, _NOBODY):
        try:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        except OSError:
            continue
        return uid, uid
    return None


def _child_env(workdir: str) -> dict[str, str]:
    # One thread per math library: the process limit counts threads, and a BLAS that
    # starts one per core would fail on a large machine.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _has_exited(pid: int) -> bool:
    """Whether the child has ended, without reaping it: while it is a zombie its pid (and
    so its process group id) cannot be reused, so killing the group stays safe."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(
    proc: subprocess.Popen, limits: SandboxLimits, deadline: float, sweep_uid: Optional[int]
) -> tuple[bytes, bytes, Optional[str]]:
    """Read stdout and stderr together until the child ends, the deadline passes or a stream
    goes over the limit; then kill what is left of the run and drain the pipes.

    Returns both streams (cut at the limit) and ``"timeout"``/``"output_limit"`` when the
    run was stopped, else None.
    """
    cap = limits.max_output_bytes
    assert proc.stdout is not None and proc.stderr is not None
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stopped: Optional[str] = None
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)

        def read_ready(timeout: float) -> None:
            nonlocal stopped
            for key, _ in selector.select(timeout):
                try:
                    chunk = os.read(key.fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                buffer += chunk
                if len(buffer) > cap and stopped is None:
                    stopped = "output_limit"

        while stopped is None and not _has_exited(proc.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            if selector.get_map():
                read_ready(min(remaining, _POLL_S))
            else:
                time.sleep(min(remaining, _POLL_S))
        _kill_all(proc.pid, sweep_uid)
        # Whatever was written before the end is still in the pipes. A process that left
        # the group and could not be swept by uid may keep them open, hence the bound.
        drain_until = time.monotonic() + _DRAIN_GRACE_S
        while selector.get_map() and time.monotonic() < drain_until:
            read_ready(max(0.0, drain_until - time.monotonic()))
    out, err = (bytes(b[:cap]) for b in buffers.values())
    return out, err, stopped


def _kill_all(pgid: int, sweep_uid: Optional[int]) -> None:
    """Kill the run's process group and, when the run had a uid of its own, every process
    of that uid."""
    _kill_group(pgid)
    if sweep_uid is not None:
        _kill_uid(sweep_uid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _live_pids_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if fields.get("State", "").strip().startswith("Z"):
            continue
        real_uid = fields.get("Uid", "").split()
        if real_uid and int(real_uid[0]) == uid:
            pids.append(int(name))
    return pids


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """Kill every live process of ``uid``: the processes of a run that left its group.
    Repeated because a process may fork between a scan and the kill."""
    for _ in range(rounds):
        pids = _live_pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _read_report(fd: int) -> Optional[dict]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, _READ_CHUNK)
    except BlockingIOError:
        return None
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _isolation(report: Optional[dict]) -> frozenset[str]:
    if not report:
        return frozenset()
    layers = {name for name in ("netns", "rlimits", "guard") if report.get(name)}
    if report.get("uid") not in (None, 0) and report.get("uid") != os.geteuid():
        layers.add("uid")
    return frozenset(layers)


def _status(stopped: Optional[str], returncode: int, stderr: bytes) -> Status:
    if stopped == "output_limit":
        return "output_limit"
    # SIGXCPU is the soft CPU limit; SIGKILL that this process did not send is the hard one
    # (the kernel's OOM killer is the only other sender, and the address-space limit keeps
    # the child far from it).
    if stopped == "timeout" or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == sandbox_child.MEMORY_EXIT:
        return "memory"
    if returncode == sandbox_child.BLOCKED_EXIT and sandbox_child.BLOCKED_MARKER.encode() in stderr:
        return "blocked"
    return "ok" if returncode == 0 else "error"
