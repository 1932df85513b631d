"""Launching a sweep's runs (dft-compare, sweep/compare.py): each launch in its own process group,
so that a stop reaches the launcher and every training process under it and a Ctrl-C in the terminal
reaches compare.py alone; the exit reason of a failed launch; who holds a lock file.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time


class Launches:
    """The sweep's running launches, so that a SIGTERM or Ctrl-C to compare.py reaches them.

    Each launch gets its own process group: a signal to the group reaches the launcher and every
    training process under it (the single-node `deepspeed` runner does not forward signals itself), and
    a Ctrl-C in the terminal reaches compare.py alone, which passes it on as SIGTERM once. The runs
    then save a checkpoint and stop (exit 143), and no launch starts after a stop.
    """

    def __init__(self):
        self.stop_signal: int | None = None
        self.inherited_fds: tuple[int, ...] = ()  # the sweep's lock (see `lock_sweep`)
        self._running: set[int] = set()  # process group ids (= the launchers' pids)
        self._lock = threading.Lock()

    def stop(self, signum: int) -> None:
        """Signal handler: remember the stop and pass SIGTERM to every running launch."""
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        with self._lock:
            groups = list(self._running)
        if first:
            for group in groups:
                _terminate_group(group)

    def run(self, command: list[str], env: dict[str, str], log, cwd: str) -> int | None:
        """Runs one launch to its end; None (not started) after a stop."""
        if self.stop_signal is not None:
            return None
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=self.inherited_fds,  # own group (Python 3.10 too)
        )
        with self._lock:
            self._running.add(process.pid)
        if self.stop_signal is not None:  # the stop came while it was starting: the handler did not see it
            _terminate_group(process.pid)
        try:
            code = process.wait()
            # The launcher can end before its workers: the deepspeed runner dies on SIGTERM at once while
            # the ranks still save their checkpoint. Wait for the whole group, so that a rerun never starts
            # beside them (bounded when not stopping: a stray process must not hang the sweep).
            deadline = None if self.stop_signal is not None else time.time() + 30
            while _group_alive(process.pid) and (deadline is None or time.time() < deadline):
                time.sleep(0.2)
            return code
        finally:
            with self._lock:
                self._running.discard(process.pid)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group is not ours to signal, but it is there
        return True


def _terminate_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass


LAUNCHES = Launches()


def exit_reason(returncode: int, log_text: str) -> str:
    """`exit 2: error: --foo ...`: the exit status and the line that says why (the last `error:` line,
    else the last line of a traceback, else the last line)."""
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}"
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if line.startswith("error:")), None)
    if why is None:
        errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*", line)]
        why = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"{status}: {why[:300]}"


def launch(command: list[str], env: dict[str, str], log_path: str, cwd: str | None = None) -> tuple[int | None, float]:
    """Runs one launch, its stdout and stderr appended to log_path. Returns (exit status, seconds); the
    status is None when the sweep was stopped before the launch started. `cwd`: where relative paths in
    the command resolve (default: the current directory, where the user started the sweep)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    started = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        code = LAUNCHES.run(command, env, log, cwd or os.getcwd())
    return code, time.time() - started


def lock_holders(path: str) -> list[int]:
    """The processes that have `path` open (Linux /proc; [] elsewhere)."""
    target, pids = os.path.realpath(path), []
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if any(os.path.realpath(os.path.join("/proc", pid, "fd", fd)) == target for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(pids)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def read_tail(path: str, limit: int = 20_000) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(max(0, os.path.getsize(path) - limit))
        return f.read()
