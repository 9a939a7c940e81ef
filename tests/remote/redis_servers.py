"""Start and stop real ``redis-server`` processes (single servers and a 3-master cluster) on loopback.

No pytest imports: the benchmark-style helpers here are plain functions and classes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"


def missing_reason() -> str | None:
    """Why the remote tests cannot run here, or None."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        return "redis-server/redis-cli not on PATH (apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install redis)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port (for a cluster node, port + 10000, its bus port, is free too)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if cluster and (port + 10000 > 65535 or not _port_free(port + 10000)):
            continue
        return port
    raise RuntimeError("no free port found")


def ping(port: int, password: str | None = None, timeout: float = 0.2) -> bool:
    """True when a Redis server answers PING on ``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            if password is not None:
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password.encode()))
                s.recv(64)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process: no persistence, loopback only, its own temp dir."""

    def __init__(
        self, workdir: Path, port: int | None = None, *, cluster: bool = False, extra: Sequence[str] = ()
    ) -> None:
        assert REDIS_SERVER is not None
        self.cluster = cluster
        self.port = port if port is not None else free_port(cluster)
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password: str | None = None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000", "--cluster-require-full-coverage", "no"]
        args += list(extra)
        if "--requirepass" in extra:
            self.password = list(extra)[list(extra).index("--requirepass") + 1]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, wait: float = 10.0) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + wait
        while not ping(self.port, self.password):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited: {(self.dir / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not answer within {wait}s")
            time.sleep(0.02)

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)

    def stop_signal(self) -> None:
        """SIGSTOP: the process is frozen; the kernel still accepts connections into its backlog."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont_signal(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class RedisCluster:
    """Three (or more) ``redis-server --cluster-enabled yes`` masters joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        assert REDIS_CLI is not None
        self.servers: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.servers.append(RedisServer(workdir, cluster=True))
            cmd = [REDIS_CLI, "--cluster", "create", *[s.addr for s in self.servers]]
            cmd += ["--cluster-replicas", "0", "--cluster-yes"]
            res = subprocess.run(cmd, capture_output=True, timeout=60)
            if res.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout!r} {res.stderr!r}")
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and the same slot coverage."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for s in self.servers:
                if s.proc is None or s.proc.poll() is not None:
                    continue
                try:
                    info = s.client().execute_command("CLUSTER", "INFO")
                except Exception:
                    info = b""
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text and "cluster_slots_assigned:16384" in text)
            if states and all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def node_id(self, server: RedisServer) -> str:
        nid = server.client().execute_command("CLUSTER", "MYID")
        return nid.decode() if isinstance(nid, bytes) else str(nid)

    def owner(self, key: bytes) -> RedisServer:
        """The server whose slot range holds ``key`` (asked from a live node)."""
        from redis.crc import key_slot

        slot = key_slot(key)
        for s in self.servers:
            if s.proc is None or s.proc.poll() is not None:
                continue
            for start, end, master, *_ in s.client().execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(x for x in self.servers if x.port == port)
        raise LookupError(f"no owner for slot {slot}")

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.servers:
            s.close()
