"""The child side of :mod:`rlflow.agents.sandbox`: confine this process, then run the code.

The parent starts ``python -I -B sandbox_child.py CONFIG`` as the leader of a new session,
with the sandbox's private directory as its working directory. Everything that needs
privileges happens here rather than in a ``preexec_fn`` of the parent: the parent may have
many threads (a Ray actor does), and between ``fork`` and ``exec`` only async-signal-safe
work is safe there, while this process is a fresh interpreter with a single thread.

The order is what makes it work:

1. a new network namespace, whose only interface (loopback) stays down, so no address at
   all (127.0.0.1 included) is reachable;
2. resource limits (CPU, address space, file size, processes, open files, no core files);
3. ``no_new_privs`` (no set-uid program can give the privileges back), then, when started
   as root, a switch to the sandbox's own uid and gid;
4. a report of what took effect, written to a pipe that is closed before the code runs, so
   the code can neither forge it nor read it;
5. the audit-hook guard, last, so that it does not refuse the setup above;
6. the code, as module ``__main__``.

Only the standard library is used, and this file is also imported by the parent for the
constants below.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import traceback
import types
from typing import Any, Callable

# Exit codes and stderr markers that the parent turns into a status. Code that prints or
# exits with them itself only reports a failure it did not have, never a success.
BLOCKED_EXIT = 86
MEMORY_EXIT = 87
SETUP_FAILED_EXIT = 88
BLOCKED_MARKER = "rlflow-sandbox: blocked"

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITABLE_ANYWHERE = frozenset({"/dev/null"})

# Events refused whatever their arguments: starting programs, reaching the network and
# name lookups (the resolver talks to the network from C, past any socket event).
_ALWAYS_BLOCKED = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.sethostname",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
})

# Events that change the file system: positions of their path arguments and of the
# ``dir_fd`` each path is relative to (None: always relative to the working directory).
_PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_network_namespace(libc: ctypes.CDLL) -> bool:
    """Move this process into a new, empty network namespace; False if the kernel refused.

    Root (with CAP_SYS_ADMIN) gets one directly. Anyone else may get one inside a new user
    namespace, where this process maps only its own uid and gid so that files it creates
    are still owned by the real user.
    """
    if libc.unshare(_CLONE_NEWNET) == 0:
        return True
    if os.geteuid() == 0:
        return False
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    try:
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError:
        # Unmapped, this process could not create files at all: better to stop here.
        raise RuntimeError("entered a user namespace but could not map this uid into it") from None
    return True


def set_limits(limits: dict[str, Any]) -> None:
    """Apply the resource limits. The CPU limit is soft (SIGXCPU) with a hard SIGKILL one
    second later, for code that ignores SIGXCPU."""
    cpu = max(1, int(limits["cpu_time_s"] + 0.999))
    memory = int(limits["memory_mb"]) * 1024 * 1024
    for name, soft, hard in (
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_AS", memory, memory),
        ("RLIMIT_FSIZE", int(limits["max_file_bytes"]), int(limits["max_file_bytes"])),
        ("RLIMIT_NPROC", int(limits["max_processes"]), int(limits["max_processes"])),
        ("RLIMIT_NOFILE", int(limits["max_open_files"]), int(limits["max_open_files"])),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _hold_import_paths() -> Callable[[], None]:
    """Keep the interpreter's own modules importable after the uid switch.

    The interpreter may live where the sandbox uid cannot reach it (a Python installed
    under /root, mode 0700). Directory descriptors opened beforehand still reach it:
    ``/proc/self/fd/N`` resolves to the directory without a search permission check on
    its parents. The returned function, called after the switch, rewrites the
    ``sys.path`` entries (and the ``__path__`` of packages already imported) that became
    unreachable, and closes the descriptors that are not needed.
    """
    held: dict[str, int] = {}
    for entry in sys.path:
        if entry and entry not in held and os.path.isdir(entry):
            held[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)

    def reroute() -> None:
        moved: dict[str, str] = {}
        for entry, fd in held.items():
            if os.access(entry, os.R_OK | os.X_OK):
                os.close(fd)
            else:
                moved[entry] = f"/proc/self/fd/{fd}"
        if not moved:
            return

        def remap(path: str) -> str:
            for old, new in moved.items():
                if path == old or path.startswith(old + os.sep):
                    return new + path[len(old):]
            return path

        sys.path[:] = [remap(p) for p in sys.path]
        for module in list(sys.modules.values()):
            search = getattr(module, "__path__", None)
            if isinstance(search, list):
                search[:] = [remap(p) if isinstance(p, str) else p for p in search]
        sys.path_importer_cache.clear()
        importlib.invalidate_caches()

    return reroute


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids), with no extra groups.
    As an unprivileged user the process-count limit applies and only the sandbox's own
    directory (and world-writable places) can be written."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError(f"could not switch to uid {uid}")


def _block(event: str, detail: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the stream may be closed or replaced
        pass
    try:
        os.write(2, f"\n{BLOCKED_MARKER}: {event} {detail}\n".encode(errors="replace")[:1000])
    finally:
        os._exit(BLOCKED_EXIT)


def install_guard(workdir: str) -> None:
    """Refuse, from inside the interpreter, what sandboxed code has no business doing.

    A ``sys.addaudithook`` hook ends the process (exit code ``BLOCKED_EXIT``, a
    ``BLOCKED_MARKER`` line on stderr) when the code starts a program or forks, opens a
    socket connection, binds, sends a datagram or looks up a name, or writes, creates,
    removes or changes a file outside ``workdir``. Audit hooks are no security boundary
    (``ctypes`` calls libc past them); they give a clear verdict on the common cases, and
    the operating-system limits set before them are what contains the rest.
    """
    root = os.path.realpath(workdir)

    def inside(path: Any, dir_fd: Any = None) -> bool:
        if isinstance(path, int):  # an open descriptor: it was checked when opened
            return True
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        if text in _WRITABLE_ANYWHERE:
            return True
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(text):
            text = os.path.join(f"/proc/self/fd/{dir_fd}", text)
        real = os.path.realpath(text)
        return real == root or real.startswith(root + os.sep)

    own_pid = os.getpid()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in _ALWAYS_BLOCKED:
            _block(event, repr(args)[:200])
        elif event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS and not inside(path):
                _block(event, repr(path)[:200])
        elif event in _PATH_EVENTS:
            for path_at, dir_fd_at in _PATH_EVENTS[event]:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None else None
                if not inside(args[path_at], dir_fd):
                    _block(event, repr(args[path_at])[:200])
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            mine = target in (0, own_pid) if event == "os.kill" else target == os.getpgid(0)
            if not mine:
                _block(event, repr(args)[:200])

    sys.addaudithook(hook)


def run_code(path: str) -> int:
    """Run the file at ``path`` as ``__main__`` and return the process's exit status.

    Tracebacks leave out this file's frame and name the code by its file name only, so
    they read as if the code had been run directly, without the temporary path. An
    exception that ends the code by running out of memory exits with ``MEMORY_EXIT``.
    """
    with open(path, "rb") as f:
        source = f.read()
    main = types.ModuleType("__main__")
    main.__dict__.update({"__file__": path, "__builtins__": builtins})
    sys.modules["__main__"] = main
    sys.argv = [path]
    try:
        exec(compile(source, os.path.basename(path), "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported like an uncaught exception
        try:
            tb = exc.__traceback__.tb_next if exc.__traceback__ else None
            traceback.print_exception(type(exc), exc, tb)
        except BaseException:  # noqa: BLE001 - e.g. out of memory again while printing
            pass
        return MEMORY_EXIT if isinstance(exc, MemoryError) else 1
    return 0


def main(config: dict[str, Any]) -> int:
    try:
        libc = _libc()
        netns = enter_network_namespace(libc)
        set_limits(config["limits"])
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        uid = config.get("uid")
        if uid is not None:
            reroute = _hold_import_paths()
            drop_privileges(int(uid), int(config["gid"]))
            reroute()
        # Die with the parent: set after the uid switch, which clears it.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != config["parent_pid"]:
            return SETUP_FAILED_EXIT
        report = {"netns": netns, "uid": os.getuid(), "rlimits": True, "guard": bool(config["guard"])}
        os.write(config["status_fd"], json.dumps(report).encode())
        os.close(config["status_fd"])
        if config["guard"]:
            install_guard(config["workdir"])
    except Exception:  # noqa: BLE001 - any setup failure must stop before the code runs
        traceback.print_exc()
        return SETUP_FAILED_EXIT
    return run_code(config["code_path"])


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
