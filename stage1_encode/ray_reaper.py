"""Take an embedded local Ray down with its driver, however the driver ends (SIGKILL included).

Ray ties the processes it starts from the driver (gcs_server, raylet, dashboard, ...) to it with PR_SET_PDEATHSIG,
but not what the raylet starts in turn (the dashboard and runtime-env agents, the workers): when the driver is
SIGKILLed those are orphaned and may live on (seen: the two agents, after 1 of 10 kills in the issue and after a
kill here). Nothing inside a SIGKILLed process can clean up, so a separate, tiny process does:

- the driver starts `python -m stage1_encode.ray_reaper TOKEN DRIVER_PID` in its own session (a signal to the
  driver's process group does not reach it) and keeps the write end of its stdin;
- the driver starts Ray with `HYDIT_STAGE1_RAY_TOKEN=TOKEN` in the environment, a token unique to this run, which
  the processes Ray starts inherit;
- while it waits, the reaper notes every second the processes that carry the token and all their descendants
  (pid and start time). The descendants matter: the agents rewrite their process title over their environment
  block (`/proc/PID/environ` then no longer shows the token), and once the raylet is dead they are children of init;
- when its stdin reaches end of file (the driver closed it after `ray.shutdown()`, or the kernel did when the driver
  died), it sends SIGTERM to the noted processes that still run (same pid and start time: never a reused pid), to
  the processes that carry the token and to their descendants, SIGKILL to any left after a grace period, and exits.

Only processes of this run's Ray are signalled: never another job's Ray, never the driver itself.
Linux only (it reads /proc); elsewhere `start` returns None and Ray's own clean-up is all there is.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENV_VAR = "HYDIT_STAGE1_RAY_TOKEN"
GRACE_S = 5.0  # SIGTERM -> SIGKILL
POLL_S = 1.0  # how often the reaper notes the run's processes while the driver lives


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    rest = fh.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
            except OSError:
                continue
            if rest[0] not in (b"Z", b"X"):  # a zombie is dead already
                out[int(entry.name)] = (int(rest[1]), int(rest[19]))
    return out


def token_processes(token: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """Pids of the processes whose initial environment holds ENV_VAR=token (only this user's are readable)."""
    needle = f"{ENV_VAR}={token}".encode()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read()
        except OSError:  # gone, or another user's
            continue
        if needle in env.split(b"\0"):
            out.append(pid)
    return out


def ray_tree(token: str, exclude: tuple[int, ...], noted: dict[int, int]) -> dict[int, int]:
    """pid -> start time of this run's Ray now: the token's processes, the still running noted ones (same start
    time), and all their descendants."""
    table = _proc_table()
    roots = {p for p in token_processes(token, exclude) if p in table}
    roots |= {p for p, t in noted.items() if p in table and table[p][1] == t}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in tree or pid in exclude:
            continue
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return {p: table[p][1] for p in tree}


def reap(
    token: str, exclude: tuple[int, ...] = (), noted: dict[int, int] | None = None, grace_s: float = GRACE_S
) -> int:
    """SIGTERM, then after `grace_s` SIGKILL, this run's Ray (see ray_tree); returns how many were signalled."""
    exclude = (*exclude, os.getpid())
    noted = dict(noted or {})
    seen: set[int] = set()
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        tree = ray_tree(token, exclude, noted)
        if not tree:
            return len(seen)
        noted.update(tree)  # a child seen once stays a target after its parent is gone
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in tree:
            seen.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL and time.monotonic() > deadline + grace_s:
            return len(seen)  # unkillable (D state): give up rather than hang
        time.sleep(0.2)


class RayReaper:
    """The driver's handle: `token` goes into Ray's environment; `close()` after `ray.shutdown()`."""

    def __init__(self, proc: subprocess.Popen, token: str) -> None:
        self.proc, self.token = proc, token

    @classmethod
    def start(cls) -> RayReaper | None:
        if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
            return None
        token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "stage1_encode.ray_reaper", token, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        return cls(proc, token)

    def close(self, timeout: float = 3 * GRACE_S) -> None:
        """Let the reaper sweep what `ray.shutdown()` left, and wait for it (bounded)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str]) -> int:
    token, driver = argv[0], int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only end of file on stdin ends the wait
    exclude = (driver, os.getpid())
    noted: dict[int, int] = {}
    fd = sys.stdin.fileno()
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready and not os.read(fd, 65536):  # the driver never writes; EOF = it closed us or it died
                break
        except OSError:
            break
        if not ready:
            try:
                live = ray_tree(token, exclude, noted)
            except OSError:
                continue
            noted = live  # the noted set stays as large as the run's Ray, not as all it ever started
    reap(token, exclude=(driver,), noted=noted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
