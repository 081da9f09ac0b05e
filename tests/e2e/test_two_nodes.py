"""The tiny pipeline on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`: two raylets on
this machine, each with 1 CPU and a custom resource of its own) with its run directory on the moto S3
server: every stage completes, the two training workers ran on different nodes, and each streamed
only the latent shards of its own data stream (the keys it recorded, train.record_samples).

The cluster lives in a child process (this file run as a script), with its own RAY_TMPDIR (so it
writes no `ray_current_cluster` where other people's Ray looks) and token authentication on with a
token of its own, so nothing of it touches this process's Ray state or the shared ~/.ray/auth_token.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

# An end-to-end run of `make test-e2e`.
pytestmark = pytest.mark.e2e

BUCKET = "e2e-two-nodes"
NODE_RESOURCES = ("node_a", "node_b")  # the head's custom resource, then the other node's

# 4 latent shards of 40 samples in 2 data streams (one per worker): 80 samples a stream and 8 a
# step, so epoch 0 holds 10 steps and steps 11-12 are in epoch 1, whose permutation deals the
# shards to the streams anew. Each worker takes 0.6 CPU of a node's 1: no node can hold both.
OVERRIDES = [
    "ingest.toy_count=160",
    "ingest.samples_per_shard=40",
    "encode.batch_size=40",
    "train.num_workers=2",
    "train.data_streams=2",
    "train.cpus_per_worker=0.6",
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


class TwoNodeCluster:
    """The child process holding the Cluster: its address and nodes, and a query of its actors."""

    def __init__(self, process: subprocess.Popen, env: dict, temp_dir: str):
        self.process, self.env, self.temp_dir = process, env, temp_dir
        hello = self._answer()
        self.address: str = hello["address"]
        self.nodes: dict[str, str] = hello["nodes"]  # custom resource -> node id

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process ended (exit {self.process.wait(timeout=30)})")
        return json.loads(line)

    def actors(self, class_name: str) -> list[dict]:
        """Every actor of `class_name` the cluster has run, dead ones too: {"node", "state"}."""
        self.process.stdin.write(json.dumps({"actors": class_name}) + "\n")
        self.process.stdin.flush()
        return self._answer()["actors"]

    def close(self) -> None:
        self.process.stdin.close()  # the child shuts the cluster down on end of input
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(uuid.uuid4().hex)
    # Short, because Ray's socket paths under it must stay below the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    process = subprocess.Popen(
        [sys.executable, __file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path_factory.mktemp("cluster") / "cluster.log", "wb"),  # noqa: SIM115 (the child holds it)
        text=True,
        env=env,
    )
    try:
        cluster = TwoNodeCluster(process, env, temp_dir)
    except BaseException:
        process.kill()
        raise
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_run_on_s3(s3_server, two_nodes, tmp_path):
    import boto3
    from run_contract import SMALL, set_args

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/run"
    command = [str(Path(sys.executable).parent / "pipeline"), "run", "--preset", "tiny", "--out", url]
    command += set_args([*[item for item in SMALL if item.split("=")[0] != "ray.num_cpus"], *OVERRIDES])
    command += set_args([f"ray.address={two_nodes.address}"])
    env = {**two_nodes.env, "RAY_ADDRESS": two_nodes.address}  # what Ray Train's helpers look for
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    from pipeline.core import layout
    from pipeline.core.rundir import RunDir

    run = RunDir(url)
    manifest = run.read_json(layout.RUN_MANIFEST)
    assert all(manifest["stages"][name]["status"] == "done" for name in layout.STAGES), manifest["stages"]

    # The two training workers ran one on each node.
    workers = two_nodes.actors("RayTrainWorker")
    assert sorted(worker["node"] for worker in workers) == sorted(two_nodes.nodes.values()), (workers, two_nodes.nodes)

    # Each rank, within each epoch, trained only on its own stream's shards: disjoint, and the ones
    # the data order dealt to it.
    shard_of = latent_shard_of_key(run)
    by_rank_epoch: dict[tuple[int, int], set[int]] = {}
    steps: dict[int, set[int]] = {0: set(), 1: set()}
    for name in run.list(layout.TRAIN_SAMPLES, ".jsonl"):
        rank = int(name.rsplit("-rank-", 1)[1].removesuffix(".jsonl"))
        for line in run.read_text(f"{layout.TRAIN_SAMPLES}/{name}").splitlines():
            row = json.loads(line)
            steps[rank].add(row["step"])
            by_rank_epoch.setdefault((rank, row["epoch"]), set()).update(shard_of[key] for key in row["keys"])
    assert steps == {0: set(range(1, 13)), 1: set(range(1, 13))}
    assert set(by_rank_epoch) == {(0, 0), (1, 0), (0, 1), (1, 1)}

    from train.data import read_spec
    from train.order import DataOrder

    order = DataOrder(read_spec(run).shard_counts, streams=2, window=4, seed=0)
    for epoch in (0, 1):
        assert not by_rank_epoch[(0, epoch)] & by_rank_epoch[(1, epoch)], by_rank_epoch
        dealt, _ = order.stream_shards(epoch)
        for rank in (0, 1):
            assert by_rank_epoch[(rank, epoch)] == set(dealt[rank]), (epoch, rank, by_rank_epoch, dealt)


def latent_shard_of_key(run) -> dict[str, int]:
    """Sample key -> index of its latent shard in the encode manifest's `latent_shards`, from the
    member names of each shard's tar parts."""
    from pipeline.core import layout

    shard_of = {}
    for index, entry in enumerate(run.read_json(layout.ENCODE_MANIFEST)["latent_shards"]):
        for part in entry["parts"]:
            with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{part}"))) as archive:
                shard_of.update((name.split(".", 1)[0], index) for name in archive.getnames())
    return shard_of


def serve_cluster() -> None:
    """The child process: start the two nodes, say where they are, answer actor queries from stdin,
    and shut the cluster down at end of input."""
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
            table = cluster.global_state.actor_table(None)
            actors = [
                {"node": actor["Address"]["NodeID"], "state": actor["State"]}
                for actor in table.values()
                if actor["ActorClassName"] == class_name
            ]
            print(json.dumps({"actors": actors}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    serve_cluster()
