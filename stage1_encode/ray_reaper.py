"""Take an embedded local Ray down with its driver, however the driver ends (SIGKILL included).

Ray ties the processes it starts from the driver (gcs_server, raylet, dashboard, ...) to it with PR_SET_PDEATHSIG,
but not what the raylet starts in turn (the dashboard and runtime-env agents, the workers): when the driver is
SIGKILLed those are orphaned and may live on (seen: 2 Ray processes after 1 of 10 kills). Nothing inside a SIGKILLed
process can clean up, so a separate, tiny process does:

- the driver starts `python -m stage1_encode.ray_reaper TOKEN DRIVER_PID` in its own session (a signal to the
  driver's process group does not reach it) and keeps the write end of its stdin;
- the driver starts Ray with `HYDIT_STAGE1_RAY_TOKEN=TOKEN` in the environment, which every Ray process inherits
  (workers included: the raylet passes its environment on), a token unique to this run;
- when the reaper's stdin reaches end of file (the driver closed it after `ray.shutdown()`, or the kernel did when
  the driver died), it sends SIGTERM to every process of this user whose initial environment carries the token,
  then SIGKILL to any still there after a grace period, and exits.

Only processes carrying this run's token are signalled: never another job's Ray, never the driver itself.
Linux only (it reads /proc); elsewhere `start` returns None and Ray's own clean-up is all there is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENV_VAR = "HYDIT_STAGE1_RAY_TOKEN"
GRACE_S = 5.0  # SIGTERM -> SIGKILL


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


def reap(token: str, exclude: tuple[int, ...] = (), grace_s: float = GRACE_S) -> int:
    """SIGTERM, then after `grace_s` SIGKILL, every process carrying `token`; returns how many were signalled."""
    exclude = (*exclude, os.getpid())
    seen: set[int] = set()
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = token_processes(token, exclude)
        if not pids:
            return len(seen)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
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
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True, close_fds=True,
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
    try:
        while sys.stdin.buffer.read(65536):  # the driver never writes; EOF = it closed us or it died
            pass
    except OSError:
        pass
    reap(token, exclude=(driver,))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
