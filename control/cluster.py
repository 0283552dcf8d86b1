"""A RabbitMQ cluster of N nodes on this one host, for development and the failover tests.

    hotswap cluster start --nodes 3 --dir /tmp/hotswap-cluster   # prints HOTSWAP_AMQP_URL=…
    hotswap cluster stop --dir /tmp/hotswap-cluster              # stops every node, removes the dir

Each node has its own name (`hs1@localhost` …), AMQP port (5701 …), distribution port (AMQP +
20000), config, data, logs and pid file under the directory, and no plugins (so no management
port to clash with a broker already here). All share one Erlang cookie, made here and handed to
the server and to every `rabbitmqctl` call as arguments (`-setcookie`, `--erlang-cookie`):
`RABBITMQ_ERLANG_COOKIE` is deprecated in 3.10, and `~/.erlang.cookie` is the main broker's.

Run as root, the nodes run as the `rabbitmq` user (as the packaged broker does), the directory
theirs. `rabbitmqctl` is used as installed: its wrapper switches to that user itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

#: The server script itself, not the /usr/sbin wrapper (which resets the environment as root).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
BROKER_USER = "rabbitmq"
STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Node:
    name: str  # e.g. hs1@localhost
    amqp_port: int
    dist_port: int

    @property
    def short(self) -> str:
        return self.name.split("@")[0]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


@dataclass
class LocalCluster:
    base: Path
    size: int = 3
    first_port: int = 5701
    prefix: str = "hs"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ClusterError("a cluster needs at least one node")
        self.nodes = [Node(f"{self.prefix}{i}@localhost", self.first_port + i - 1, self.first_port + i - 1 + 20000)
                      for i in range(1, self.size + 1)]
        self.cookie_file = self.base / "cookie"
        self._servers: dict[str, subprocess.Popen[bytes]] = {}

    # -- addresses -------------------------------------------------------------------------------

    def urls(self, *order: int) -> str:
        """`HOTSWAP_AMQP_URL` for the nodes, comma separated: every node in order, or those given
        (0-based), in the order given (a process connects to the first that answers)."""
        chosen = [self.nodes[i] for i in order] if order else self.nodes
        return ",".join(node.url for node in chosen)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if name in (n.name, n.short))

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> LocalCluster:
        """Start every node, join the others to the first, wait until all run clustered."""
        self._prepare()
        for node in self.nodes:
            self.start_node(node, wait=False)
        for node in self.nodes:
            self.await_node(node, timeout_s)
        for node in self.nodes[1:]:
            self._join(node, self.nodes[0])
        self.await_clustered(timeout_s)
        self._save()
        return self

    def start_node(self, node: Node, *, wait: bool = True, timeout_s: float = 180.0) -> None:
        """Start (or restart, after `kill` or `stop_node`) one node; it rejoins from its data."""
        directory = self.base / node.short
        with (directory / "server.out").open("ab") as out:
            command = [SERVER] if os.geteuid() != 0 else ["runuser", "-u", BROKER_USER, "--", SERVER]
            # A session of its own: the nodes outlive `hotswap cluster start`, and `stop` can end
            # the whole process group (the script, erl, beam and its port programs) by its id.
            self._servers[node.name] = subprocess.Popen(
                command, env=self._env(node), cwd=directory, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if (self.base / STATE_FILE).is_file():
            self._save()  # `hotswap cluster stop` must find the new process group too
        if wait:
            self.await_node(node, timeout_s)

    def await_node(self, node: Node, timeout_s: float = 180.0) -> None:
        """`await_startup` fails at once while the node is not yet known to epmd: ask until it answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            server = self._servers.get(node.name)
            if server is not None and server.poll() is not None:
                raise ClusterError(f"{node.name} exited ({server.returncode}): {self._tail(node)}")
            if self.ctl(node, "await_startup", "--timeout", "60", timeout_s=90).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} did not start within {timeout_s:.0f} s: {self._tail(node)}")
            time.sleep(0.5)

    def await_clustered(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while set(self.running_nodes()) != {n.name for n in self.nodes}:
            if time.monotonic() > deadline:
                raise ClusterError(f"not clustered within {timeout_s:.0f} s: running {self.running_nodes()}")
            time.sleep(0.5)

    def kill(self, node: Node) -> None:
        """kill -9 the node's Erlang VM: no goodbye to its peers or its clients."""
        os.kill(self._beam_pid(node), signal.SIGKILL)
        server = self._servers.pop(node.name, None)
        if server is not None:
            server.wait(30)

    def stop_node(self, node: Node) -> None:
        """A clean stop (rabbitmqctl stop), as a rolling restart does."""
        self.ctl(node, "stop", timeout_s=120)
        server = self._servers.pop(node.name, None)
        if server is not None:
            server.wait(60)

    def stop(self) -> None:
        """Stop every node, end what is left of their process groups, remove the directory."""
        groups = self._process_groups()
        for node in reversed(self.nodes):
            if self._alive(node):
                self.ctl(node, "stop", timeout_s=60)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):  # stopped cleanly: nothing left
                os.killpg(group, signal.SIGKILL)
        for server in self._servers.values():
            server.wait(30)
        self._servers.clear()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- questions -------------------------------------------------------------------------------

    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl",
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        command = [tool, "--erlang-cookie", self.cookie(), "-n", node.name, *args]
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(command, 124, "", f"timed out: {exc}")

    def query(self, node: Node, *args: str, tool: str = "rabbitmqctl") -> Any:
        """A CLI command's answer as JSON (`--formatter json`)."""
        done = self.ctl(node, *args, "--formatter", "json", tool=tool)
        if done.returncode != 0:
            raise ClusterError(f"{tool} {' '.join(args)} on {node.name}: {done.stdout}{done.stderr}")
        return json.loads(done.stdout)

    def running_nodes(self) -> list[str]:
        for node in self._live_nodes():
            done = self.ctl(node, "cluster_status", "--formatter", "json")
            if done.returncode == 0:
                return list(json.loads(done.stdout).get("running_nodes", []))
        return []

    def leader(self, queue: str) -> Node:
        """The node that leads a quorum queue (or a stream) now."""
        for node in self._live_nodes():
            rows = self.query(node, "list_queues", "name", "leader")
            for row in rows:
                if row["name"] == queue and row.get("leader"):
                    return self.node(str(row["leader"]))
        raise ClusterError(f"no leader for {queue!r}")

    def members(self, queue: str) -> list[str]:
        """The nodes that hold a replica of a quorum queue or a stream."""
        rows = self.query(self._live_nodes()[0], "list_queues", "name", "members")
        return sorted(next(row["members"] for row in rows if row["name"] == queue))

    def connections(self) -> list[tuple[str, int]]:
        """(connection name the client gave, server port) of every client connection."""
        rows = self.query(self._live_nodes()[0], "list_connections", "client_properties", "port")
        return [(_connection_name(row["client_properties"]), int(row["port"])) for row in rows]

    def cookie(self) -> str:
        return self.cookie_file.read_text().strip()

    # -- inner workings --------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.base.exists() and any(self.base.iterdir()):
            raise ClusterError(f"{self.base} is not empty: a cluster may be running there (hotswap cluster stop)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.cookie_file.write_text(secrets.token_hex(20))
        (self.base / "enabled_plugins").write_text("[].\n")  # no management: no port of its own to clash
        (self.base / "rabbitmq-env.conf").write_text("# the nodes' settings are in their environment\n")
        for node in self.nodes:
            directory = self.base / node.short
            (directory / "home").mkdir(parents=True)
            (directory / "rabbitmq.conf").write_text(_config(node))
        self.base.chmod(0o700)  # the cookie is the cluster's password
        if os.geteuid() == 0:
            for path in [self.base, *self.base.rglob("*")]:
                shutil.chown(path, BROKER_USER, BROKER_USER)

    def _env(self, node: Node) -> dict[str, str]:
        directory = self.base / node.short
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory / "home"),
            "RABBITMQ_NODENAME": node.name, "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port), "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"), "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "beam.pid"),
            # The host's rabbitmq-env.conf is the main broker's (its node name, its flags): not ours.
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            # Distribution on loopback only: the cookie is all that guards it.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                f"-setcookie {self.cookie()} -kernel inet_dist_use_interface {{127,0,0,1}}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _join(self, node: Node, seed: Node) -> None:
        for step in (("stop_app",), ("join_cluster", seed.name), ("start_app",)):
            done = self.ctl(node, *step, timeout_s=120)
            if done.returncode != 0:
                raise ClusterError(f"{' '.join(step)} on {node.name}: {done.stdout}{done.stderr}")

    def _beam_pid(self, node: Node) -> int:
        return int((self.base / node.short / "beam.pid").read_text().strip())

    def _alive(self, node: Node) -> bool:
        try:
            os.kill(self._beam_pid(node), 0)
        except (OSError, ValueError):
            return False
        return True

    def _live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if self._alive(n)] or self.nodes

    def _process_groups(self) -> list[int]:
        """Each started node's process group: this process's, or those `cluster.json` recorded."""
        groups = [server.pid for server in self._servers.values()]
        state = self.base / STATE_FILE
        if state.is_file():
            groups += json.loads(state.read_text()).get("process_groups", [])
        return sorted(set(groups))

    def _save(self) -> None:
        state = {"nodes": [asdict(n) for n in self.nodes], "process_groups": [s.pid for s in self._servers.values()],
                 "size": self.size, "first_port": self.first_port, "prefix": self.prefix}
        (self.base / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _tail(self, node: Node, lines: int = 30) -> str:
        out = self.base / node.short / "server.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:]) if out.is_file() else ""

    @classmethod
    def load(cls, base: Path) -> LocalCluster:
        """The cluster `hotswap cluster start` left running in `base`."""
        state = json.loads((base / STATE_FILE).read_text())
        return cls(base, state["size"], state["first_port"], state["prefix"])


def _config(node: Node) -> str:
    return "\n".join([
        f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
        # A node that cannot see a majority stops serving rather than diverging.
        "cluster_partition_handling = pause_minority",
        "log.file.level = info", "",
    ])


def _connection_name(properties: Any) -> str:
    """`client_properties` as rabbitmqctl's JSON gives it: a list of [key, type, value] triples."""
    items: Iterator[Any] = iter(properties if isinstance(properties, list) else [])
    for item in items:
        if isinstance(item, list) and len(item) == 3 and item[0] == "connection_name":
            return str(item[2])
    return ""


# -- `hotswap cluster start | stop` ----------------------------------------------------------------

cluster_app = typer.Typer(help="A RabbitMQ cluster on this host, for development and the failover tests.",
                          no_args_is_help=True)
ClusterDir = Annotated[Path, typer.Option("--dir", help="where the nodes keep config, data and logs (run as root, "
                                                       "the rabbitmq user must reach it)")]
#: Under /tmp: run as root, the nodes run as the broker user, who may not reach a home or a checkout.
DEFAULT_DIR = Path("/tmp/hotswap-cluster")


@cluster_app.command("start")
def start_command(
    directory: ClusterDir = DEFAULT_DIR,
    nodes: Annotated[int, typer.Option(min=1, max=9)] = 3,
    port: Annotated[int, typer.Option(help="the first node's AMQP port; the others follow")] = 5701,
) -> None:
    """Start the nodes, cluster them, print the settings that point Hotswap at them."""
    cluster = LocalCluster(directory.resolve(), nodes, port).start()
    print(f"HOTSWAP_AMQP_URL={cluster.urls()}")
    print(f"HOTSWAP_QUEUE_REPLICAS={nodes}")


@cluster_app.command("stop")
def stop_command(directory: ClusterDir = DEFAULT_DIR) -> None:
    """Stop every node and remove the directory."""
    if not (directory / STATE_FILE).is_file():
        print(f"no cluster in {directory}")
        raise typer.Exit(1)
    LocalCluster.load(directory.resolve()).stop()
    print(f"stopped; {directory} removed")
