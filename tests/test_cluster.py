"""A real two-node Ray cluster on this machine (the ``ray_cluster`` fixture): a head (``ray start
--head`` on 127.0.0.1) and a second node process joining it. Builds run on it through
``runtime.ray_address`` and must give the same samples as the local executor: the S3 test
(tests/test_store_s3.py) builds into a bucket on it, kills the driver with kill -9, resumes there
and compares with a local build.

Teardown stops exactly the processes this test started: the cluster gets its own ``--temp-dir``,
and teardown ends (by PID) every process that holds a file open under it or carries a marker
variable that ``ray start`` passes on (GCS, raylets, agents, workers).
(``ray stop --force`` would end every Ray process of the user on the machine, other runs' too;
in a CI container that is the same thing, on a shared machine it is not.)
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

import pytest

RAY = Path(sys.executable).with_name("ray")
MARKER = "LOOKANDLEARN_TEST_CLUSTER"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_block(avoid: int, size: int = 200) -> int:
    """Start of ``size`` consecutive ports (head node at +0, second node at +100) below the kernel's
    ephemeral range, all bindable now and not containing ``avoid`` (the GCS port)."""
    for start in range(20000 + (avoid % 40) * size, 30000, size):
        if avoid in range(start, start + size):
            continue
        try:
            for offset in (0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104, 105):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", start + offset))
        except OSError:
            continue
        return start
    raise RuntimeError("no free block of ports for the test cluster")


def _temp_dir(tag: str) -> str:
    return f"/tmp/llray-{tag[:10]}"  # short: Ray's unix socket paths live under it


def _marked(tag: str) -> list[int]:
    """PIDs of this user's processes that belong to the test cluster ``tag``: ``MARKER=tag`` in
    their environment, or a file open under the cluster's temp dir (Ray's agents get a clean
    environment but keep their logs open there)."""
    needle = f"{MARKER}={tag}".encode()
    root = _temp_dir(tag) + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
                continue
            for fd in (entry / "fd").iterdir():
                try:
                    if os.readlink(fd).startswith(root):
                        pids.append(int(entry.name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return pids


def _stop(tag: str) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _marked(tag)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _marked(tag):
            time.sleep(0.2)


def _ray_env(tag: str) -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", **{MARKER: tag})


def _node_args(port_base: int) -> list[str]:
    # every port explicit: two raylets on one host must not both take the default agent ports
    return ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=300000000",
            f"--node-manager-port={port_base}", f"--object-manager-port={port_base + 1}",
            f"--dashboard-agent-listen-port={port_base + 2}", f"--dashboard-agent-grpc-port={port_base + 3}",
            f"--runtime-env-agent-port={port_base + 4}", f"--metrics-export-port={port_base + 5}",
            f"--min-worker-port={port_base + 10}", f"--max-worker-port={port_base + 60}"]


@pytest.fixture
def ray_cluster(tmp_path):
    if not RAY.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    tag = uuid.uuid4().hex
    port = _free_port()
    env = _ray_env(tag)
    base = _port_block(avoid=port)
    head = [str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={_temp_dir(tag)}", *_node_args(base)]
    worker = [str(RAY), "start", f"--address=127.0.0.1:{port}", *_node_args(base + 100)]
    # `ray start --head` also records the cluster in /tmp/ray/ray_current_cluster, where every later
    # `ray.init()` without an address would look for a cluster to join: put back what was there
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    try:
        for cmd in (head, worker):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        address = f"127.0.0.1:{port}"
        probe = ("import ray, time\n"
                 f"ray.init(address='{address}', logging_level='ERROR')\n"
                 "deadline = time.time() + 60\n"
                 "while time.time() < deadline and sum(n['Alive'] for n in ray.nodes()) < 2: time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources().get('CPU'))\n")
        out = subprocess.run([sys.executable, "-c", probe], env=dict(env, **{MARKER: ""}), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        nodes, cpus = out.stdout.split()[-2:]
        assert int(nodes) == 2 and float(cpus) == 2.0, out.stdout
        yield address
    finally:
        _stop(tag)
        shutil.rmtree(_temp_dir(tag), ignore_errors=True)
        try:
            if current.exists() and current.read_text().strip().endswith(f":{port}"):
                if before is None:
                    current.unlink()
                else:
                    current.write_text(before)
        except OSError:
            pass
