"""Forked servers: local-swarm servers forked from a process that already imported the server's code.

A server process spends about 4 s of CPU importing torch, transformers and hivemind before it does anything
else, and the test suite starts a few hundred of them on two cores. With ``STAMEN_FORK_SERVERS=1`` in the
environment (the tests' ``conftest`` sets it) ``swarm.tools.localswarm`` asks one such process, started
once per parent (``python -m swarm.tools.zygote FD MODULE...``, which imports the modules its parent names:
the server's entry module and the families' transformers modeling code), to fork each ``python -m server``
(or another server entry module) instead of starting a new interpreter.

The child is a real server process: its own pid and session (process group), its own libp2p daemon and
DHT node, the entry module run as ``__main__`` with the same arguments and environment, its output on a
pipe the parent reads, its exit code (negative for a signal, as ``subprocess`` gives it) reported back.
Only the imported code is shared (copy-on-write pages), so memory figures differ from a started
interpreter's: benchmarks and the tests that measure memory or exits start servers the usual way
(``LocalSwarm(fork=False)``).

The zygote runs no torch operation (forked children start their own thread pools) and no thread. It
ends with its parent (``swarm.net.lifetime``), and its children end with it.

Protocol, over a Unix ``SOCK_SEQPACKET`` socket pair (one message per packet): the parent sends
``{"argv": [...], "env": {...}, "cwd": ...}`` with the write end of the child's output pipe attached (``SCM_RIGHTS``);
the zygote answers ``{"pid": N}`` once forked and ``{"exit": N, "code": C}`` when a child ends.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback

from swarm.net.lifetime import end_with_parent

PACKET = 1 << 20


class ForkedProcess:
    """A forked server as ``subprocess.Popen`` offers it: ``pid``, ``stdout``, ``poll``, ``wait``, ``returncode``."""

    def __init__(self, zygote: Zygote, args: list[str], pid: int, stdout):
        self.zygote, self.args, self.pid, self.stdout = zygote, args, pid, stdout

    @property
    def returncode(self) -> int | None:
        return self.zygote.exits.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.changed:
            if not self.zygote.changed.wait_for(lambda: self.pid in self.zygote.exits, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
            return self.zygote.exits[self.pid]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The parent's side: starts the zygote, asks it for children, learns their pids and exit codes."""

    _shared: Zygote | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, preload: tuple[str, ...]) -> Zygote:
        """This process's zygote, started on first use (from the main thread: it ends with this process)
        with the modules ``preload`` imported (names that fail to import are skipped)."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.proc.poll() is not None:
                cls._shared = cls(preload)
            return cls._shared

    def __init__(self, preload: tuple[str, ...]):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.tools.zygote", str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=end_with_parent(signal.SIGKILL) if main else None,
        )
        theirs.close()
        self.sock = mine
        self.exits: dict[int, int] = {}
        self.changed = threading.Condition()
        self._pids: list[int] = []
        self._lock = threading.Lock()  # one fork request at a time: its answer is the next pid
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()
        atexit.register(self.proc.kill)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(PACKET)
            except OSError:
                data = b""
            with self.changed:
                if not data:
                    self._pids.append(-1)  # the zygote is gone: a waiting fork fails
                    self.changed.notify_all()
                    return
                message = json.loads(data)
                if "pid" in message:
                    self._pids.append(message["pid"])
                else:
                    self.exits[message["exit"]] = message["code"]
                self.changed.notify_all()

    def fork(self, args: list[str], env: dict[str, str], timeout: float = 180.0) -> ForkedProcess:
        """Run ``args`` (``python -m MODULE ...``) as a forked child with environment ``env``."""
        if args[1:2] != ["-m"]:
            raise ValueError(f"only `python -m MODULE ...` can be forked, not {args}")
        read, write = os.pipe()
        with self._lock:
            try:
                request = json.dumps({"argv": args[2:], "env": env, "cwd": os.getcwd()}).encode()
                socket.send_fds(self.sock, [request], [write])
            finally:
                os.close(write)
            with self.changed:
                if not self.changed.wait_for(lambda: self._pids, timeout):
                    os.close(read)
                    raise TimeoutError("the zygote did not fork in time")
                pid = self._pids.pop(0)
        if pid < 0:
            os.close(read)
            raise RuntimeError("the zygote process ended")
        return ForkedProcess(self, args, pid, os.fdopen(read, "r", encoding="utf-8", errors="replace"))


# -- the zygote process --


def _preload(modules: list[str]) -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as server.__main__ sets it, before libgomp loads
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:  # e.g. a family's modeling code this transformers lacks: its servers import their own
            pass


def _child(request: dict, out: int, arm) -> None:
    """In the forked child: become the server process ``request`` describes; never returns. ``arm``: makes
    the child end with the zygote (``end_with_parent``, made before the fork)."""
    code = 1
    try:
        os.setsid()
        if arm is not None:
            arm()
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        module, *rest = request["argv"]
        sys.argv = [module, *rest]
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # as an interpreter's exit does
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def main(fd: int, preload: list[str]) -> None:
    sock = socket.socket(fileno=fd)
    _preload(preload)
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        _reap(sock)
        if not readable:
            continue
        data, fds, _, _ = socket.recv_fds(sock, PACKET, 1)
        if not data:
            return  # the parent is gone
        sys.stdout.flush()
        sys.stderr.flush()
        arm = end_with_parent(signal.SIGTERM)  # a zygote that ends takes its children with it
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(json.loads(data), fds[0], arm)
        os.close(fds[0])
        sock.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
