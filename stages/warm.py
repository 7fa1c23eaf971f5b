"""Warm starts for the `lmmrec` command: each of `dvc repro`'s ~50 stage commands would spend
~1.5-2 s importing torch & co. (another ~3 s where it builds a CLIP), so a per-user server
imports them once and forks a fresh process for each command.

The forked process runs the command exactly as a cold start would: with the caller's argv,
working directory, umask, environment and stdin/stdout/stderr, from a process that has
imported only third-party libraries (the project's own modules are imported fresh by each
command, so an edit is never missed). A server serves only callers whose interpreter, module
path, installed packages, environment (all but `VOLATILE`), CPUs, priority, limits and cgroup
are those it was started with; anything else gets its own server. It runs as the caller's
user, listens on a socket in a folder only that user can open, and exits after
`LMMREC_WARM_IDLE` seconds (default 60) without a command.

`LMMREC_WARM=0` turns it off (every command then starts cold); it is off under torchrun and
wherever the server cannot start, and a command the server could not take runs cold.
Ctrl-C and other signals reach the command as they would a cold one; if the caller dies the
command is stopped.

This module imports only the standard library: it is the start of every `lmmrec` process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping

# Imported by the server before it takes commands, then (while no command runs) the extras.
# Only libraries whose import starts no thread but OpenBLAS's pool, which is rebuilt after a
# fork: polars and pyarrow start allocator and clean-up threads, so each command imports them.
PRELOAD = ("torch", "numpy", "typer", "yaml", "tqdm")
EXTRAS = ("torchvision", "open_clip", "scipy.stats", "dvclive", "matplotlib.pyplot")
# Environment variables that may differ between the commands one server runs: DVC names each
# stage in DVC_STAGE; the shell's own bookkeeping. The command always gets the caller's value.
VOLATILE = frozenset({"DVC_STAGE", "PWD", "OLDPWD", "_", "SHLVL"})
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
START_TIMEOUT_S = 60.0  # a server slower than this to come up is not waited for
FIRST_CALLER_S = 2.0  # extras wait this long for the caller that started the server
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL, for a command whose caller died
HEADER = struct.Struct("!I")
LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_NOFILE,
          resource.RLIMIT_STACK, resource.RLIMIT_CPU, resource.RLIMIT_CORE)  # fmt: skip


def main() -> None:
    """The `lmmrec` console script: the command in a warm server's fork, else started cold."""
    code = run_warm(sys.argv[1:])
    if code is None:
        from stages.cli import main as cold

        cold()  # ends the process
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- client side


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether commands use a warm server: not when turned off, under torchrun or off Linux."""
    if environ.get("LMMREC_WARM", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if any(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def server_key(environ: Mapping[str, str] = os.environ) -> str:
    """What a server must share with its callers, hashed: the interpreter and its flags, the
    module path, the install (folders' mtimes change when packages are added or removed), this
    file, the environment but `VOLATILE`, and the process's CPUs, priority, limits and cgroup
    (which its fork inherits from the server)."""

    def mtime(path: str) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return 0

    paths = [p for p in sys.path if p]
    try:
        with open("/proc/self/cgroup") as cgroup:
            group = cgroup.read()
    except OSError:
        group = ""
    state = {
        "python": [sys.executable, sys.version, repr(sys.flags)],
        "path": [[p, mtime(p)] for p in paths],
        "warm": mtime(__file__),
        "env": sorted((k, v) for k, v in environ.items() if k not in VOLATILE),
        # what a process inherits besides: the CPUs it may use, its priority, limits, cgroup
        "process": [sorted(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0),
                    [resource.getrlimit(r) for r in LIMITS], group],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:24]


def socket_folder(environ: Mapping[str, str] = os.environ) -> str | None:
    """The caller's private folder for server sockets, created 0700; None when it exists but
    is not a folder that only this user can open (then every command starts cold)."""
    base = environ.get("LMMREC_WARM_DIR")
    if not base:
        root = environ.get("XDG_RUNTIME_DIR") or environ.get("TMPDIR") or "/tmp"
        base = os.path.join(root, f"lmmrec-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(base)
    private = (info.st_mode & 0o170000) == 0o040000 and info.st_mode & 0o077 == 0
    return base if private and info.st_uid == os.getuid() else None


def run_warm(argv: list[str]) -> int | None:
    """Run ``lmmrec argv`` in a warm server's fork and return its exit status; None when it
    must run cold (turned off, no server, or the server took nothing before failing)."""
    if not enabled() or len(argv) == 0 or argv[0] in {"--help", "-h"}:
        return None
    folder = socket_folder()
    if folder is None:
        return None
    path = os.path.join(folder, server_key() + ".sock")
    if len(path.encode()) > 96:  # AF_UNIX paths (and the server's temporary name) take 107
        return None
    try:
        conn = _connect(path) or _start_server(path)
    except OSError:  # no lock file, no process: start cold
        return None
    if conn is None:
        return None
    with conn:
        return _run_on(conn, argv)


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _start_server(path: str) -> socket.socket | None:
    """Start a server for ``path`` (one at a time: a lock beside it) and connect to it."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)  # another caller may have started it meanwhile
        if conn is not None:
            return conn
        boot = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); " \
               "from stages.warm import serve; serve(sys.argv[2])"  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, json.dumps(sys.path), path], cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(0.02)
        return None


def _run_on(conn: socket.socket, argv: list[str]) -> int | None:
    """Send the command with this process's stdio, relay signals, return its exit status."""
    umask = os.umask(0o022)
    os.umask(umask)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
    try:
        data = json.dumps(request).encode()
        conn.settimeout(START_TIMEOUT_S)  # a server that hangs: the command is stopped there
        socket.send_fds(conn, [HEADER.pack(len(data)) + data], [0, 1, 2])
        started = _read_line(conn)
        conn.settimeout(None)
    except OSError:  # a timeout included
        started = b""
    if started != b"started":  # the server did not take the command: run it cold
        return None

    def forward(signum: int, _frame: object) -> None:
        try:
            conn.sendall(b"%d\n" % signum)
        except OSError:
            pass

    relayed = [n for n in FORWARDED if signal.getsignal(n) is not signal.SIG_IGN]  # as cold
    previous = {signum: signal.signal(signum, forward) for signum in relayed}
    try:
        status = _read_line(conn)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not status:
        print("lmmrec: the warm server ended before the command did", file=sys.stderr)
        return 1
    kind, value = status.split()
    if kind == b"signal":  # end as a cold process killed by that signal would
        signum = int(value)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(value)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            return b""
        data += chunk
    return data.strip()


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid``, read from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:  # "pid (comm) state ppid ...": comm may hold ")"
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def servers(folder: str | None = None) -> list[int]:
    """Pids of the servers listening in ``folder`` (default: this user's socket folder), read
    from /proc; their supervisors and commands, forks sharing their command line, left out.
    Each leads its own session: ``os.killpg(pid, signal.SIGTERM)`` stops it with them."""
    folder = folder or socket_folder()
    found: dict[int, int | None] = {}  # pid -> parent pid
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            continue
        ours = len(words) > 4 and words[2].endswith(b"serve(sys.argv[2])")
        where = os.path.dirname(os.fsdecode(words[-2])) if ours else None
        if folder and where and os.path.abspath(where) == os.path.abspath(folder):
            found[int(entry.name)] = parent_pid(int(entry.name))
    return sorted(pid for pid, parent in found.items() if parent not in found)


# ----------------------------------------------------------------------------- server side


def serve(path: str) -> None:
    """Import `PRELOAD`, listen on ``path`` and fork each connection's command; when idle,
    import `EXTRAS`; exit after `LMMREC_WARM_IDLE` seconds without a command."""
    import importlib

    idle_s = float(os.environ.get("LMMREC_WARM_IDLE", "60"))
    for name in PRELOAD:
        importlib.import_module(name)
    extras = list(EXTRAS)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temp = f"{path}.{os.getpid()}"
    listener.bind(temp)
    listener.listen(16)
    os.replace(temp, path)  # atomically replaces a dead server's socket
    inode = os.stat(path).st_ino
    children: set[int] = set()
    last = started = time.monotonic()
    try:
        while True:
            for pid in list(children):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
                    last = time.monotonic()
            # never beside a running command, nor before the caller that started it connects
            first = started == last and time.monotonic() - started < FIRST_CALLER_S
            preload = bool(extras) and not children and not first
            wait_s = 0.0 if preload else 0.1 if first else 1.0
            ready, _, _ = select.select([listener], [], [], wait_s)
            if ready:
                conn, _ = listener.accept()
                children.add(_fork_supervisor(conn, listener))
                conn.close()
                last = time.monotonic()
            elif preload:
                try:
                    importlib.import_module(extras.pop(0))
                except Exception:  # noqa: BLE001 - a command importing it will say why
                    pass
            elif not children and time.monotonic() - last > idle_s:
                return
    finally:
        try:
            if os.stat(path).st_ino == inode:  # not a newer server's
                os.unlink(path)
                os.unlink(path + ".lock")
        except OSError:
            pass
        listener.close()


def _fork_supervisor(conn: socket.socket, listener: socket.socket) -> int:
    """Fork a process that runs the command in its own fork and reports how it ended."""
    pid = os.fork()
    if pid:
        return pid
    try:
        listener.close()
        code = _supervise(conn)
    except BaseException:
        code = 1
    os._exit(code)


def _supervise(conn: socket.socket) -> int:
    """Take one caller's command (from this user only), fork it, report how it ended."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        return 1
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < HEADER.size or len(fds) != 3:
        return 1
    (size,) = HEADER.unpack_from(data)
    data = data[HEADER.size :]
    while len(data) < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return 1
        data += chunk
    request = json.loads(data)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_command(request, fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(b"started\n")
    except OSError:  # the caller gave up waiting: it runs the command itself
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 1
    status = _wait(pid, conn)
    if os.WIFSIGNALED(status):
        report = b"signal %d\n" % os.WTERMSIG(status)
    else:
        report = b"exit %d\n" % os.waitstatus_to_exitcode(status)
    conn.sendall(report)
    return 0


def _wait(pid: int, conn: socket.socket) -> int:
    """The command's wait status, relaying the caller's signals; if the caller goes away the
    command gets SIGTERM, then SIGKILL after `STOP_GRACE_S`."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError:  # a kernel before 5.3: look every 50 ms
        pidfd = None
    deadline = None
    while True:
        watched = [conn] if deadline is None else []
        waits = watched + ([pidfd] if pidfd else [])
        ready, _, _ = select.select(waits, [], [], 1.0 if pidfd else 0.05)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if deadline is not None and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        if conn in ready:
            message = conn.recv(256)
            if not message:  # the caller died
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_GRACE_S
                continue
            for word in message.split():
                if word.isdigit() and int(word) in FORWARDED:
                    os.kill(pid, int(word))


def _run_command(request: dict, fds: list[int]) -> None:
    """In the command's process: become the caller (directory, umask, environment, stdio,
    argv), then run the CLI; never returns."""
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = ["lmmrec", *request["argv"]]
        from stages.cli import main as cold

        cold()  # ends the process with the command's exit status
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException as exc:  # a crash outside the CLI's own handling
        if not isinstance(exc, SystemExit):
            import traceback

            traceback.print_exc()
        else:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stderr.flush()
    os._exit(code)
