"""Servers the pipeline starts listen on loopback only, unless configured otherwise.

- the toy data server (`ingest.download.toy_server.serve_directory`): 127.0.0.1 by default;
- the private local Ray instance (`pipeline.core.ray_runtime.ensure_ray` without ray.address or
  RAY_ADDRESS): no dashboard frontend and no job API (the minimal dashboard head Ray
  still starts loads only its usage-stats module), and every listening socket of every process it
  started (GCS, raylet, workers, dashboard and runtime-env agents) on loopback. Joining a
  cluster (ray.address) leaves binding to that cluster's own `ray start` options.

No other server is started: grep finds no other HTTPServer, bind or serve call in the pipeline.
"""

from __future__ import annotations

import ipaddress
import urllib.request

import psutil

from ingest.download.toy_server import serve_directory


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `pids`."""
    sockets = []
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids:
            sockets.append((connection.laddr.ip, connection.laddr.port, psutil.Process(connection.pid).name()))
    return sockets


def is_loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(parsed, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or parsed).is_loopback


def test_the_toy_server_listens_on_loopback(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with serve_directory(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        port = int(base.rsplit(":", 1)[1])
        assert urllib.request.urlopen(f"{base}/x.txt", timeout=10).read() == b"hello"
        ours = [s for s in listening({psutil.Process().pid}) if s[1] == port]
        assert [address for address, _, _ in ours] == ["127.0.0.1"]


def test_the_local_ray_instance_listens_on_loopback_only_and_has_no_dashboard(ray_local):
    import ray
    from ray._private import ray_constants

    ray.get(ray.remote(lambda: 1).remote())  # at least one worker process is up
    node = ray._private.worker._global_node
    assert node.node_ip_address == "127.0.0.1"
    # include_dashboard=False still starts a minimal dashboard head: no frontend, no job API.
    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_DASHBOARD, []):
        args = psutil.Process(info.process.pid).cmdline()
        modules = [arg for arg in args if arg.startswith("--modules-to-load=")]
        assert modules and "Job" not in modules[0] and "--host=127.0.0.1" in args, args
    me = psutil.Process()
    sockets = listening({me.pid} | {child.pid for child in me.children(recursive=True)})
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names  # the check saw Ray's servers
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
