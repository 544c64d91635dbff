"""Many nodes, one configuration: two real daemons on two loopback addresses, each with the
same shared mailgate.toml and a node.toml of its own.

- ``contrib/rolling-reload`` rolls a mailertable change node by node (mail follows it on node
  1 while node 2 still routes the old way), and stops at a node whose config is broken,
  which keeps running its old one.
- ``mailgate mailq --node`` / ``qshape --node`` read both queues through the metrics
  listeners with the shared token; no token, a wrong one and a node that is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailgate import metrics, monitor, queuehttp, runstate
from mailgate.queue import listing
from mailgate.queue.spool import Envelope, Recipient, Spool
from mailgate.snapshot import load_snapshot
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port, run_cli
from tests.support.world import HOP1, SENDER, SENDER_DNS, SinkFactory, message, wait_until

DNS_RECORDS = SENDER_DNS
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "contrib" / "rolling-reload"
TOKEN = "5f0c8e1d2b7a4c6e9f3a1b2c3d4e5f60"
HOSTS = {"n1": "127.0.0.1", "n2": "127.0.0.21"}


def shared_config(dns: str) -> str:
    """mailgate.toml, byte for byte the same on both nodes (as a sync would leave it)."""
    return (
        'include = ["node.toml"]\nspool_dir = "spool"\n'
        '[queue]\nretry_min = "1h"\nrun_interval = "1h"\n'
        '[delivery]\nconnect_timeout = "2s"\n'
        '[smtp]\ngreet_pause = "0s"\nbad_rcpt_throttle = 0\n'
        f'[dns]\nnameservers = ["{dns}"]\ntimeout = "2s"\n'
        '[log]\nfile = "maillog"\n'
        '[metrics]\ntoken_file = "../cluster.token"\n'
    )


@dataclass
class Node:
    name: str
    gw: GatewayProcess
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://{self.gw.host}:{self.metrics_port}"

    @property
    def node_file(self) -> Path:
        return self.gw.dir / "node.toml"

    def tables(self, mailertable: str) -> None:
        (self.gw.dir / "mailertable").write_text(mailertable)
        (self.gw.dir / "access").write_text("To:targetdomain1.com  RELAY\nTo:deadend.test  RELAY\n")

    def send(self, subject: str, rcpts: list[str] | None = None) -> None:
        with self.gw.smtp() as s:
            s.sendmail(SENDER, rcpts or ["bob@targetdomain1.com"], message(subject))

    def running_generation(self) -> str | None:
        """The generation in the daemon's state file (what `mailgate status` shows)."""
        state = runstate.read(runstate.state_path(self.gw.spool / "mailgate.pid"))
        assert state is not None
        return state.generation

    def status(self) -> str:
        out = run_cli("status", "-c", str(self.gw.config))
        assert out.returncode == 0, out.stderr
        return out.stdout


@pytest.fixture
def nodes(tmp_path: Path, dns: DnsServer) -> Iterator[list[Node]]:
    (tmp_path / "cluster.token").write_text(TOKEN + "\n")
    (tmp_path / "cluster.token").chmod(0o600)
    made = []
    for name, host in HOSTS.items():
        gw = GatewayProcess(tmp_path / name, dns=None, host=host)
        gw.config.write_text(shared_config(dns.address))
        node = Node(name, gw, free_port(host))
        node.node_file.write_text(
            f'hostname = "{name}.example.com"\nlisten = ["{host}:{gw.port}"]\n'
            f'[metrics]\nlisten = "{host}:{node.metrics_port}"\n'
        )
        made.append(node)
    yield made
    for node in made:
        node.gw.stop()


def test_rolling_reload_follows_the_change_node_by_node_and_stops_at_a_broken_node(
    tmp_path: Path, nodes: list[Node], make_sink: SinkFactory
) -> None:
    old, new = make_sink(HOP1), make_sink(HOP1)
    n1, n2 = nodes
    for node in nodes:
        node.tables(f"targetdomain1.com   smtp:[{HOP1}]:{old.port}\n")
        node.gw.start()
    first = load_snapshot(n1.gw.config).generation
    assert f"(generation {load_snapshot(n2.gw.config).generation})" in n2.status()
    assert f"  config     {n1.gw.config} (generation {first})\n" in n1.status()

    # The sync: the new mailertable on both nodes. A probe runs as the command template: before
    # the roll's first command on n2, one message through each node.
    for node in nodes:
        node.tables(f"targetdomain1.com   smtp:[{HOP1}]:{new.port}\n")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, smtplib, sys\n"
        f"marker = {str(tmp_path / 'probed')!r}\n"
        "if sys.argv[1] == 'n2' and not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        f"    for host, port in {[(n.gw.host, n.gw.port) for n in nodes]!r}:\n"
        "        with smtplib.SMTP(host, port, timeout=10) as s:\n"
        f"            s.sendmail({SENDER!r}, ['bob@targetdomain1.com'],\n"
        "                       f'Subject: between {host}\\r\\n\\r\\nx\\r\\n')\n"
        "os.execvp(sys.argv[2], sys.argv[2:])\n"
    )
    rolled = roll(tmp_path, f"{sys.executable} {probe} {{node}}")
    g1, g2 = (load_snapshot(n.gw.config).generation for n in nodes)
    assert g1 != first
    assert (rolled.returncode, rolled.stderr) == (0, "")
    assert rolled.stdout.splitlines() == [
        f"rolling-reload: n1: checked, generation {g1}; reloading",
        f"rolling-reload: n1: generation {g1} in force (1 of 2)",
        f"rolling-reload: n2: checked, generation {g2}; reloading",
        f"rolling-reload: n2: generation {g2} in force (2 of 2)",
        "rolling-reload: all 2 nodes reloaded",
    ]
    # Between the two: node 1 already routed to the new hop, node 2 still to the old one.
    new.wait_subject(f"between {n1.gw.host}")
    old.wait_subject(f"between {n2.gw.host}")
    n2.send("after the roll")
    new.wait_subject("after the roll")

    # Back to the old hop, but node 2's node file is broken: node 1 takes the change, node 2
    # is not reloaded and keeps routing to the new hop.
    for node in nodes:
        node.tables(f"targetdomain1.com   smtp:[{HOP1}]:{old.port}\n")
    n2.node_file.write_text(n2.node_file.read_text() + "[smtp]\nmax_recipients = 0\n")
    stopped = roll(tmp_path, "")
    error = f"{n2.node_file}:6: smtp.max_recipients: must be at least 1"
    g1 = load_snapshot(n1.gw.config).generation
    assert stopped.returncode == 1
    assert stopped.stdout.splitlines() == [
        f"rolling-reload: n1: checked, generation {g1}; reloading",
        f"rolling-reload: n1: generation {g1} in force (1 of 2)",
    ]
    assert stopped.stderr == (
        "rolling-reload: STOPPED at n2: mailgate check failed; the daemon keeps its "
        f"configuration:\nerror: {error}\n"
    )
    n1.send("n1 after the stop")
    n2.send("n2 after the stop")
    old.wait_subject("n1 after the stop")
    new.wait_subject("n2 after the stop")
    assert n2.running_generation() == g2  # (`mailgate status` needs a config that loads)
    # A HUP all the same (the reload the script did not send): refused, the old config stays.
    n2.gw.signal(signal.SIGHUP)
    n2.gw.wait_log(f"reload refused, keeping the running configuration: {error}")
    n2.send("n2 after the HUP")
    new.wait_subject("n2 after the HUP")
    assert n2.running_generation() == g2


def roll(tmp_path: Path, template: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [
        "sh",
        str(SCRIPT),
        "-x",
        template,
        "-m",
        f"{sys.executable} -m mailgate.cli",
        "-c",
        f"{tmp_path}/{{node}}/mailgate.toml",
        "-t",
        "20",
        *HOSTS,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


# -- the cluster's queue --------------------------------------------------------------------------


def get(url: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "-c", str(node.gw.config))


def test_mailq_and_qshape_of_two_nodes_with_the_token(tmp_path: Path, nodes: list[Node]) -> None:
    n1, n2 = nodes
    dead = f"[127.0.0.12]:{free_port('127.0.0.12')}"  # nothing listens: the mail stays queued
    for node in nodes:
        node.tables(f"deadend.test   smtp:{dead}\n.deadend.test   smtp:{dead}\n")
        node.gw.start()
    n1.send("one", ["a@deadend.test"])
    n1.send("two", ["b@deadend.test", "c@deadend.test"])
    n2.send("three", ["d@sub.deadend.test"])
    for node, count in ((n1, 2), (n2, 1)):
        # Each message attempted once (and not again for an hour): the listing stays as it is.
        wait_until(
            lambda node=node, count=count: (
                [
                    o["attempts"]
                    for o in map(json.loads, cli(node, "mailq", "--json").stdout.splitlines())
                ]
                == [1] * count
            ),
            f"{count} deferred message(s) at {node.name}",
        )

    # The endpoint: /health needs no token, /queue needs the right one.
    assert get(f"{n1.url}/health", None)[0] == 200
    status, headers, body = get(f"{n1.url}/queue", None)
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="mailgate"')
    assert body == b"the cluster token is needed (Authorization: Bearer)\n"
    assert get(f"{n1.url}/queue", "x" * 32)[:3:2] == (403, b"wrong token\n")
    status, headers, body = get(f"{n1.url}/queue", TOKEN)
    assert (status, headers["Transfer-Encoding"], headers["X-Mailgate-Queue-Count"]) == (
        200,
        "chunked",
        "2",
    )
    assert body.decode() == cli(n1, "mailq", "--json").stdout
    assert n1.gw.log_lines("/queue refused to 127.0.0.1: wrong token")
    assert n1.gw.log_lines("/queue read by 127.0.0.1: 2 entries")

    # mailq --node: each node's section is its own mailq, under a line naming it.
    local = {node.name: cli(node, "mailq").stdout for node in nodes}
    both = cli(n1, "mailq", "--node", n1.url, "--node", n2.url.removeprefix("http://"))
    assert (both.returncode, both.stderr) == (0, "")
    assert both.stdout == (
        f"n1.example.com ({n1.url}):\n{local['n1']}"
        f"n2.example.com ({n2.url}):\n{local['n2']}"
        "\t\tTotal requests on 2 nodes: 3\n"
    )
    as_json = cli(n2, "mailq", "--json", "--node", n1.url, "--node", n2.url)
    assert [(o["node"], o["sender"]) for o in map(json.loads, as_json.stdout.splitlines())] == [
        (n1.url, SENDER),
        (n1.url, SENDER),
        (n2.url, SENDER),
    ]

    # A node that is down: named on stderr, the others printed, exit status 1.
    down = f"http://127.0.0.1:{free_port()}"
    partial = cli(n1, "mailq", "--node", n1.url, "--node", down, "--node", n2.url)
    assert partial.returncode == 1
    assert (
        partial.stderr
        == f"mailgate: node {down}: cannot reach it: [Errno 111] Connection refused\n"
    )
    assert partial.stdout == (
        f"n1.example.com ({n1.url}):\n{local['n1']}"
        f"n2.example.com ({n2.url}):\n{local['n2']}"
        "\t\tTotal requests on 2 of 3 nodes; 1 did not answer: 3\n"
    )
    # Another token: refused by each node.
    wrong = tmp_path / "wrong.token"
    wrong.write_text("y" * 32)
    wrong.chmod(0o600)
    refused = cli(n1, "mailq", "--node", n1.url, "--token-file", str(wrong))
    assert refused.returncode == 1
    assert refused.stderr == f"mailgate: node {n1.url}: 403 Forbidden: wrong token\n"

    # qshape --node: the shapes summed (every message is younger than 5 minutes).
    expected = listing.Shape()
    expected.add(["deadend.test"], 0)
    expected.add(["deadend.test", "deadend.test"], 0)
    expected.add(["sub.deadend.test"], 0)
    shaped = cli(n2, "qshape", "--node", n1.url, "--node", n2.url)
    assert (shaped.returncode, shaped.stderr) == (0, "")
    assert shaped.stdout.splitlines() == expected.lines()
    per_node = cli(n2, "qshape", "--per-node", "--node", n1.url, "--node", n2.url).stdout
    assert per_node.startswith(f"n1.example.com ({n1.url}):\n")
    assert per_node.endswith("all nodes (2 of 2 answered):\n" + shaped.stdout)


# -- the endpoint in process: batches, limit, a token set by a reload -----------------------------


def fill(spool: Spool, n: int) -> None:
    async def commit() -> None:
        for i in range(n):
            env = Envelope(
                qid=f"BATCH{i:09d}",
                sender=SENDER,
                recipients=[Recipient(f"r{i}@example.net", f"r{i}@example.net")],
                arrival=time.time(),
            )
            incoming = spool.open_incoming(env)
            incoming.write(b"Subject: x\r\n\r\nHello.\r\n")
            (await spool.commit(incoming)).close()

    asyncio.run(commit())


def raw_get(port: int, target: str) -> bytes:
    """The whole answer, as the bytes came (to see the chunks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        answer = b""
        while block := s.recv(65536):
            answer += block
    return answer


def test_the_queue_endpoint_streams_in_batches_and_follows_the_token_of_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queuehttp, "BATCH", 4)
    spool = Spool(tmp_path / "spool", fsync="threads")
    fill(spool, 10)
    lines = [listing.mailq_json(e) for e in listing.entries(spool)]
    token: list[str | None] = [None]

    async def main() -> None:
        sock = monitor.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = monitor.MonitorServer(
            sock,
            metrics.Table(1),
            lambda: monitor.Gauges(0, 0, None, 0, False),
            monitor.QueueCount(spool),
            lambda: [],
            lambda: monitor.Identity("gw.example.com", token[0]),
        )
        await server.start()
        url = f"http://127.0.0.1:{port}"
        off = await asyncio.to_thread(get, f"{url}/queue", TOKEN)
        assert off[::2] == (404, b"the queue is not served: [metrics] token_file is not set\n")
        token[0] = TOKEN  # as a reload that sets token_file: no restart
        answer = await asyncio.to_thread(raw_get, port, "/queue")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"\r\nX-Mailgate-Queue-Count: 10\r\n" in head
        chunks = []
        while True:
            size, _, body = body.partition(b"\r\n")
            chunks.append(body[: int(size, 16)])
            body = body[int(size, 16) + 2 :]
            if size == b"0":
                break
        assert [c.count(b"\n") for c in chunks] == [4, 4, 2, 0]  # BATCH entries each
        assert b"".join(chunks).decode().splitlines() == lines
        limited = await asyncio.to_thread(get, f"{url}/queue?limit=5", TOKEN)
        assert limited[2].decode().splitlines() == lines[:5]
        assert (await asyncio.to_thread(get, f"{url}/queue?limit=x", TOKEN))[::2] == (
            400,
            b"limit is a whole number, 1 or more\n",
        )
        status, _, body = await asyncio.to_thread(get, f"{url}/qshape?by=sender", TOKEN)
        assert (status, json.loads(body)["rows"]) == (
            200,
            {"TOTAL": [10, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0], "example.org": [10, 10] + [0] * 9},
        )
        assert (await asyncio.to_thread(get, f"{url}/metrics", None))[0] == 200
        await server.close()

    asyncio.run(main())
    spool.close()
