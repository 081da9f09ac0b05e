"""The tiny pipeline on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`: two raylets on
this machine, each with 1 CPU and a custom resource of its own) with its run directory on the moto S3
server: every stage completes, the two training workers ran one on each node, and each streamed only
the latent shards of its own data stream (the keys it recorded, train.record_samples).

The cluster lives in a child process (this file run as a script) with its own RAY_TMPDIR (so no
`ray_current_cluster` file where other Ray users look) and token authentication on with a token of
its own: nothing of it touches this process's Ray state or the shared ~/.ray/auth_token.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BUCKET = "e2e-two-nodes"
NODE_RESOURCES = ("node_a", "node_b")  # the head's custom resource, then the other node's

# 4 latent shards of 40 samples in 2 data streams (one per worker): 80 samples a stream and 8 a step,
# so epoch 0 holds 10 steps and steps 11-12 are in epoch 1, whose permutation deals the shards to the
# streams anew. STRICT_SPREAD puts each worker on a node of its own.
OVERRIDES = [
    "ingest.toy_count=160",
    "ingest.samples_per_shard=40",
    "encode.batch_size=40",
    "train.num_workers=2",
    "train.data_streams=2",
    "train.cpus_per_worker=0.5",
    'train.placement_strategy="STRICT_SPREAD"',
    "train.batch_size_per_worker=8",
    "train.max_steps=12",
    "train.checkpoint_every=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.record_samples=true",
    "sample.steps=2",
    "sample.seeds=[0]",
    "sample.guidance_scales=[0.0, 3.0]",
    'sample.prompts=["a red circle on a green background", "a blue square on a black background"]',
]


class TwoNodes:
    """The child process holding the cluster: its address, its nodes, and what actors ran where."""

    def __init__(self, process: subprocess.Popen, env: dict):
        self.process, self.env = process, env
        hello = self._answer()
        self.address: str = hello["address"]
        self.nodes: dict[str, str] = hello["nodes"]  # custom resource -> node id

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process ended (exit {self.process.wait(timeout=30)})")
        return json.loads(line)

    def actor_nodes(self, class_name: str) -> list[str]:
        """The node id of every actor of `class_name` the cluster has run, dead ones too."""
        self.process.stdin.write(json.dumps({"actors": class_name}) + "\n")
        self.process.stdin.flush()
        return self._answer()["nodes"]

    def close(self) -> None:
        """End of input: the child shuts the cluster down (its reaper would, were the child killed)."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    from ray._private import ray_constants

    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(uuid.uuid4().hex)
    # Short, because Ray's socket paths under it must stay below the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # Loopback only, as `pipeline.core.ray_runtime` keeps its local instance: with Ray clusters "off", a
    # driver joining 127.0.0.1:PORT keeps that address instead of swapping in the machine's own.
    env[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, env=env
        )
    try:
        cluster = TwoNodes(process, env)
    except BaseException:
        process.kill()
        process.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"the two-node cluster did not start: {log.read_text()[-3000:]}") from None
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_run_on_s3_trains_one_worker_per_node_on_its_own_shards(s3_server, two_nodes, tmp_path):
    import boto3

    from pipeline.core import layout
    from pipeline.core.rundir import RunDir
    from train.data import read_spec
    from train.order import DataOrder

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/run"
    overrides = [*OVERRIDES, f"ray.address={two_nodes.address}"]
    command = [str(Path(sys.executable).parent / "pipeline"), "run", "--preset", "tiny", "--out", url]
    command += [arg for item in overrides for arg in ("--set", item)]
    # RAY_ADDRESS too, for Ray's own helpers that look for "the" cluster (Ray Train's placement group cleaner).
    console = run_logged(command, {**two_nodes.env, "RAY_ADDRESS": two_nodes.address}, tmp_path / "console.txt")

    run = RunDir(url)
    stages = run.read_json(layout.RUN_MANIFEST)["stages"]
    assert all(stages[name]["status"] == "done" for name in layout.STAGES), stages
    assert stages["train"]["steps"] == 12 and stages["sample"]["counts"]["checkpoints"] == 2, stages

    # One training worker on each node.
    assert sorted(two_nodes.actor_nodes("RayTrainWorker")) == sorted(two_nodes.nodes.values()), two_nodes.nodes

    # Within each epoch, each rank trained on the shards the data order dealt to its stream, and on no
    # other: the two ranks' shards are disjoint.
    order = DataOrder(read_spec(run).shard_counts, streams=2, window=4, seed=0)
    dealt = {epoch: order.stream_shards(epoch)[0] for epoch in (0, 1)}
    trained = shards_trained(run)
    assert sorted(trained) == [(rank, epoch) for rank in (0, 1) for epoch in (0, 1)], trained
    for epoch in (0, 1):
        assert not trained[(0, epoch)] & trained[(1, epoch)], trained
        for rank in (0, 1):
            assert trained[(rank, epoch)] == set(dealt[epoch][rank]), (rank, epoch, trained, dealt)

    # ... and read no other: rank 0 logs how many shards it read (a shard its stream keeps from epoch 0
    # into epoch 1 is read once).
    read = re.search(r"latent shards read by rank 0: \{'shards': (\d+)", console)
    assert read, console[-3000:]
    assert int(read[1]) == len(set(dealt[0][0]) | set(dealt[1][0])), (read[0], dealt)


def run_logged(command: list[str], env: dict, log: Path, timeout: float = 600) -> str:
    """Run `command` with its output in `log`; its output, or a failure showing the end of it."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            code = f"killed after {timeout} s"
    console = log.read_text()
    assert code == 0, f"{code}:\n{console[-6000:]}"
    return console


def shards_trained(run) -> dict[tuple[int, int], set[int]]:
    """(rank, epoch) -> indices (in the encode manifest's `latent_shards`) of the shards whose samples
    the rank trained on in that epoch, from its recorded keys; every step 1-12 recorded once per rank."""
    from pipeline.core import layout

    shard_of = {}  # sample key -> shard, from the member names of each shard's one latent tar
    for index, entry in enumerate(run.read_json(layout.ENCODE_MANIFEST)["latent_shards"]):
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{entry['name']}.tar"))) as archive:
            shard_of.update((name.split(".", 1)[0], index) for name in archive.getnames())
    trained: dict[tuple[int, int], set[int]] = {}
    steps: dict[int, list[int]] = {0: [], 1: []}
    for name in run.list(layout.TRAIN_SAMPLES, ".jsonl"):
        rank = int(name.removesuffix(".jsonl").rsplit("-rank-", 1)[1])
        for line in run.read_text(f"{layout.TRAIN_SAMPLES}/{name}").splitlines():
            row = json.loads(line)
            steps[rank].append(row["step"])
            trained.setdefault((rank, row["epoch"]), set()).update(shard_of[key] for key in row["keys"])
    assert {rank: sorted(numbers) for rank, numbers in steps.items()} == {0: list(range(1, 13)), 1: list(range(1, 13))}
    return trained


def serve_cluster() -> None:
    """The child process: start the two nodes, print where they are, answer actor queries read from
    stdin, and shut the cluster down at end of input."""
    from ray.cluster_utils import Cluster

    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "resources": {NODE_RESOURCES[0]: 1}})
    try:
        other = cluster.add_node(**common, resources={NODE_RESOURCES[1]: 1})
        cluster.wait_for_nodes()
        nodes = {NODE_RESOURCES[0]: cluster.head_node.node_id, NODE_RESOURCES[1]: other.node_id}
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        for line in sys.stdin:
            class_name = json.loads(line)["actors"]
            actors = cluster.global_state.actor_table(None).values()
            found = [actor["Address"]["NodeID"] for actor in actors if actor["ActorClassName"] == class_name]
            print(json.dumps({"nodes": found}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    serve_cluster()
