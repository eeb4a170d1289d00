"""Start and stop real servers for tests and benchmarks: `bentoml serve` (and any other
command that serves HTTP) on a free loopback port, as its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

BENTOML_BIN = str(Path(sys.executable).parent / "bentoml")
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    ready_path: str = "/readyz"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[tuple[str, psutil.Process]]:
        """The worker processes, each with the service it serves (its `--service-name`)."""
        found: list[tuple[str, psutil.Process]] = []
        for proc in self._tree():
            try:
                command = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--service-name" in command:
                found.append((command[command.index("--service-name") + 1], proc))
        return found

    def stop(self) -> int:
        """SIGTERM the process group (serve forwards it to its workers), SIGKILL if it
        lingers. Workers run in process groups of their own, so any left are killed too."""
        workers = self._tree()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        _kill_all(workers)
        return self.proc.returncode

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the server and every worker: it keeps its sockets, so
        connections are accepted by the kernel and never answered (a hung service)."""
        for p in [psutil.Process(self.proc.pid), *self._tree()]:
            try:
                p.suspend() if frozen else p.resume()
            except psutil.NoSuchProcess:
                continue

    def kill(self) -> None:
        """SIGKILL the server and every worker at once: a crash, not a shutdown."""
        workers = self._tree()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        _kill_all(workers)


def _kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=10)


def start_process(
    command: list[str], cwd: Path, env: dict[str, str], port: int, log_path: Path,
    ready_path: str = "/readyz", wait: bool = True, timeout: float = READY_TIMEOUT_S,
) -> ServerProcess:
    full_env = {**os.environ, **env, "BENTOML_DO_NOT_TRACK": "true"}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, ready_path)
    if wait:
        wait_ready(server, timeout)
    return server


def start_server(
    serve_args: list[str], cwd: Path, env: dict[str, str], wait: bool = True
) -> ServerProcess:
    """`bentoml serve ARGS --host 127.0.0.1 --port <free>`; waits for /readyz when `wait`."""
    port = free_port()
    log_path = Path(env.get("BENTOML_HOME", cwd)) / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [BENTOML_BIN, "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port)]
    return start_process(command, cwd, env, port, log_path, wait=wait)


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}{server.ready_path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"{server.url} not ready after {timeout} s:\n{server.log()[-4000:]}")


MLFLOW_BIN = str(Path(sys.executable).parent / "mlflow")


def start_mlflow_server(data_dir: Path, timeout: float = 180.0) -> ServerProcess:
    """A real `mlflow server` on a free loopback port, as its own process group: a SQLite
    backend and a local artifact folder in `data_dir`, the artifacts served through the
    server (`mlflow-artifacts:/`), so clients share nothing but its URL. `stop()` ends it
    and every process it started."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [MLFLOW_BIN, "server", "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}",
               "--artifacts-destination", str(data_dir / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    return start_process(command, data_dir, {}, port, data_dir / "mlflow-server.log", ready_path="/health",
                         timeout=timeout)  # fmt: skip


REDIS_SERVER_BIN = "/usr/bin/redis-server"


@dataclass
class RedisServer:
    """A real redis-server on a loopback port, its data in `data_dir`, with the settings that
    make an acknowledged write survive its crash: the append-only file, fsync'd before each
    reply. `kill()` then `start()` again is a crash and a restart on the same data."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        command = [REDIS_SERVER_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                   "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"]  # fmt: skip
        with (self.data_dir / "redis.log").open("ab") as log_file:
            self.proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self._answers_ping():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {timeout} s:\n{self.log()[-4000:]}")

    def _answers_ping(self) -> bool:
        # RESP by hand: no client library needed to ask "are you up (and done loading)?".
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        return (self.data_dir / "redis.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM by its pid (Redis finishes its append-only file), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_redis(data_dir: Path, port: int | None = None) -> RedisServer:
    """redis-server on a free loopback port (or `port`, e.g. to restart on the same one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return RedisServer(port or free_port(), data_dir).start()
