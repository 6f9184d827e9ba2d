"""A real two-node Ray cluster on this machine, for the tests (the `ray_cluster` fixture
in tests/conftest.py starts one per session; docs/deploy.md gives the same commands).

Each node is one `ray start --block` process of the test environment's own `ray`, in a
process group of its own and a private `--temp-dir`, so stopping it (SIGTERM, then
SIGKILL to its group) ends that node and nothing else on the machine: never `ray stop`,
which stops every Ray process of the user. A node also gets SIGTERM when the process
that started it dies (PR_SET_PDEATHSIG), so a killed test run leaves no cluster behind.
The nodes advertise loopback addresses only (head 127.0.0.2, worker 127.0.0.3), the
dashboard is off, and Ray's token
authentication is on with a token made for this cluster: a client reaches it only with
`env` (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Each node has one custom resource of its
own (`node_a`, `node_b`), so a test can place a replica on either node.

Ray 2.60 still binds its GCS and raylet gRPC ports on the wildcard address for any node
address other than 127.0.0.1 (which in turn makes its agents use the machine's outward
address); the token is what turns away a client that is not ours.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _end_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies,
    so a test run that is killed (no teardown) still ends its nodes."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Node:
    name: str  # its custom resource
    ip: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class RayCluster:
    """`start()` both nodes; `stop()` them; `stop_node`/`start_node` for node loss."""

    cpus_per_node: int = 4  # logical CPUs: what actors may ask for, not cores
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nnray-")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client (a server, a driver) needs to join: the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _node_env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, **self.env, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> None:
        self.port = _free_port(HEAD_IP)
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--block", "--num-cpus", str(self.cpus_per_node), "--object-store-memory", str(80 * 2**20),
                  "--disable-usage-stats", "--temp-dir", str(self.root / "ray")]
        self.nodes["node_a"] = Node("node_a", HEAD_IP, [ray, "start", "--head", "--port", str(self.port),
                                                       "--include-dashboard=false", *common])
        self.nodes["node_b"] = Node("node_b", WORKER_IP, [ray, "start", "--address", self.address, *common])
        try:
            self.start_node("node_a")
            self.start_node("node_b")
        except BaseException:
            self.stop()
            raise

    def start_node(self, name: str, timeout: float = 120.0) -> None:
        node = self.nodes[name]
        log = open(self.root / f"{name}.log", "ab")
        resources = json.dumps({name: self.cpus_per_node})
        node.proc = subprocess.Popen([*node.args, "--node-ip-address", node.ip, "--resources", resources],
                                     env=self._node_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_end_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while "block forever" not in self.log(name):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{self.log(name)}")
            time.sleep(0.2)

    def stop_node(self, name: str) -> None:
        """End the node's `ray start` and every process in its group (SIGKILL if needed)."""
        node = self.nodes[name]
        proc, node.proc = node.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of this node only (its own group)
        except ProcessLookupError:
            pass

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):  # the worker node first, then the head
            self.stop_node(name)
        shutil.rmtree(self.root, ignore_errors=True)

    def driver(self, code: str, token: bool = True, timeout: float = 120.0) -> Any:
        """Run `code` in a fresh Python that has joined the cluster as a driver (namespace
        "nnglass", as the server's actors); `token=False`: with no token at all."""
        args, kw = self._driver(code, token)
        return subprocess.run(args, **kw, capture_output=True, text=True, timeout=timeout)

    def start_driver(self, code: str) -> subprocess.Popen[str]:
        """`driver`, in the background (its output piped)."""
        args, kw = self._driver(code, True)
        return subprocess.Popen(args, **kw, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _driver(self, code: str, token: bool) -> tuple[list[str], dict[str, Any]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(self.env if token else {})
        env["PYTHONPATH"] = self._node_env()["PYTHONPATH"]
        join = (f"import ray\nray.init(address={self.address!r}, _node_ip_address={HEAD_IP!r}, "
                "namespace='nnglass')\n")
        return [sys.executable, "-c", join + code], {"env": env, "cwd": self.root}

    def server_toml(self, text: str) -> str:
        """A server config's text with its replicas on this cluster."""
        ray = f'engine = "ray"\nray_address = "{self.address}"\nray_node_ip = "{HEAD_IP}"\n'
        assert "[server]\n" in text, text
        return text.replace("[server]\n", "[server]\n" + ray, 1)
