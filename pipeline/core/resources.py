"""Whether a stage's Ray request can ever be granted, checked before it starts.

Ray waits for resources that never come: Ray Train for a placement group larger than the cluster, an
encoder actor for a GPU no node has; meanwhile the GPUs are billed. So before a stage starts (and before
the first stage, for every stage of the run), its request is compared with what the cluster has: its
totals (`ray.cluster_resources()`) and, where an autoscaler reported its node groups to Ray, the most they
can grow to (what Ray Train V2 checks too). A request that cannot fit fails at once, naming the keys to
change and the numbers on both sides. Where an autoscaler runs without reporting its limits, the check can
only warn; `ray.check_resources = false` turns it off.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pipeline.core.config import PipelineConfig

EPSILON = 1e-9  # fractional CPUs add up with rounding errors
MAX_NODES = 10_000  # an autoscaler's node group larger than this is judged by its totals only


@dataclass(frozen=True)
class Ask:
    """`count` bundles of `bundle`, all held at once, each on one node; `shown` says which keys make it."""

    what: str
    count: int
    bundle: dict[str, float]
    shown: str
    bundle_keys: str  # the keys that set `bundle`
    scale_key: str | None = None  # the key that sets `count`, where lowering it is the way out


@dataclass(frozen=True)
class Cluster:
    """What the stage's request is compared with: `totals` per resource, the `nodes` (resources each), and where
    the numbers come from."""

    totals: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)  # each node there is (or can be added), when known
    source: str = "ray.cluster_resources()"


def training_reservation(config: PipelineConfig) -> dict[str, float]:
    """What the train stage's Ray Train run reserves in all: its workers, as train/stage.py asks for them, and
    Ray Train's own trainer/controller actor, which ScalingConfig.total_resources counts (none in Ray Train V2,
    whose controller takes 0 CPUs)."""
    from ray.train import ScalingConfig

    train = config.train
    scaling = ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=worker_resources(config))
    return {resource: float(amount) for resource, amount in scaling.total_resources.items()}


def worker_resources(config: PipelineConfig) -> dict[str, float]:
    """What each Ray Train worker asks for (train/stage.py's ScalingConfig)."""
    train = config.train
    return {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}


def stage_asks(name: str, config: PipelineConfig) -> list[Ask]:
    """What stage `name` holds at once at the least, as its code asks Ray for it."""
    if name == "ingest":  # one shard task at a time is slow but finishes
        cpus = config.ingest.cpus_per_task
        return [Ask("shard download task", 1, {"CPU": cpus}, f"ingest.cpus_per_task = {cpus:g}", "ingest.cpus_per_task")]
    if name == "encode":
        encode = config.encode
        actor = {"CPU": encode.cpus_per_actor, **({"GPU": encode.gpus_per_actor} if encode.gpus_per_actor else {})}
        shown = f"encode.num_actors = {encode.num_actors} x (encode.cpus_per_actor = {encode.cpus_per_actor:g}"
        shown += f", encode.gpus_per_actor = {encode.gpus_per_actor:g})" if encode.gpus_per_actor else ")"
        return [
            # Calls are dealt to every actor: one that never starts holds its shards forever.
            Ask(
                "encoder actors",
                encode.num_actors,
                actor,
                shown,
                "encode.cpus_per_actor, encode.gpus_per_actor",
                "encode.num_actors",
            ),
            # Beside them, a decode task must run, or the actors wait for batches that never come.
            Ask(
                "decode task",
                1,
                {"CPU": encode.cpus_per_decode_task},
                f"encode.cpus_per_decode_task = {encode.cpus_per_decode_task:g}",
                "encode.cpus_per_decode_task",
            ),
        ]
    if name == "train":
        train, worker = config.train, worker_resources(config)
        shown = f"train.num_workers = {train.num_workers} x (train.cpus_per_worker = {train.cpus_per_worker:g}"
        shown += ", one GPU each: train.use_gpu)" if train.use_gpu else ")"
        keys = "train.cpus_per_worker" + (", or train.use_gpu = false" if train.use_gpu else "")
        asks = [Ask("training workers", train.num_workers, worker, shown, keys, "train.num_workers")]
        trainer = {
            resource: amount - train.num_workers * worker.get(resource, 0.0)
            for resource, amount in training_reservation(config).items()
        }
        trainer = {resource: amount for resource, amount in trainer.items() if amount > EPSILON}
        if trainer:  # Ray Train V1's trainer actor
            asks.append(Ask("Ray Train trainer", 1, trainer, "Ray Train's trainer actor", "train.cpus_per_worker"))
        return asks
    return []  # sample and report run in the driver


def unfit(name: str, config: PipelineConfig, cluster: Cluster) -> str | None:
    """Why stage `name`'s request can never be granted on `cluster`, naming the keys and the numbers on both
    sides, with the way out; None where it fits (in totals, and each bundle on one node)."""
    asks = stage_asks(name, config)
    for ask in asks:
        if cluster.nodes and not any(_holds(node, ask.bundle) for node in cluster.nodes):
            largest = max(cluster.nodes, key=lambda node: tuple(node.get(r, 0.0) for r in ("GPU", *ask.bundle)))
            missing = [r for r in ask.bundle if not any(node.get(r, 0.0) > 0 for node in cluster.nodes)]
            return (
                f"stage {name!r} cannot start: each {ask.what.removesuffix('s')} asks for {_amounts(ask.bundle)} on one "
                f"node ({ask.shown}) but the largest node has {_amounts({r: largest.get(r, 0.0) for r in ask.bundle})} "
                f"({cluster.source}); lower {ask.bundle_keys}, or add nodes "
                + (f"with {' and '.join(missing)}s" if missing else "that large")
            )
    needed: dict[str, float] = {}
    for ask in asks:
        for resource, amount in ask.bundle.items():
            needed[resource] = needed.get(resource, 0.0) + ask.count * amount
    short = [resource for resource, amount in needed.items() if amount > cluster.totals.get(resource, 0.0) + EPSILON]
    if not short:
        packed = next((ask for ask in asks if cluster.nodes and _per_nodes(ask.bundle, cluster.nodes) < ask.count), None)
        if packed is None:
            return None
        return (
            f"stage {name!r} cannot start: its {packed.count} {packed.what} ({packed.shown}) fit in the cluster's totals "
            f"but only {_per_nodes(packed.bundle, cluster.nodes)} fit on its nodes, each holding whole ones "
            f"({cluster.source}); {_way_out(asks, cluster)}"
        )
    resource = next((r for r in ("GPU", "CPU") if r in short), short[0])  # GPUs first: what is billed
    parts = " + ".join(f"{ask.count * ask.bundle[resource]:g} ({ask.shown})" for ask in asks if ask.bundle.get(resource, 0.0) > 0)
    message = (
        f"stage {name!r} cannot start: it asks for {needed[resource]:g} {resource}s at once: {parts}, "
        f"but the cluster has {cluster.totals.get(resource, 0.0):g} ({cluster.source})"
    )
    return f"{message}; {_way_out(asks, cluster)}"


def _way_out(asks: list[Ask], cluster: Cluster) -> str:
    scaled = next((ask for ask in asks if ask.scale_key), None)
    if scaled is not None:
        others = {r: sum(a.count * a.bundle.get(r, 0.0) for a in asks if a is not scaled) for r in scaled.bundle}
        most = min(
            math.floor((cluster.totals.get(r, 0.0) - others[r]) / amount + EPSILON)
            for r, amount in scaled.bundle.items()
            if amount > 0
        )
        if cluster.nodes:
            most = min(most, _per_nodes(scaled.bundle, cluster.nodes))
        if most >= 1:
            return f"set {scaled.scale_key} to at most {most} (--set {scaled.scale_key}={most}), or use a larger cluster"
    keys = ", ".join(ask.scale_key or ask.bundle_keys for ask in asks)
    return f"lower {keys}, or use a larger cluster"


def _per_nodes(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many `bundle`s the nodes hold, each whole on one node."""
    return sum(
        min(math.floor(node.get(resource, 0.0) / amount + EPSILON) for resource, amount in bundle.items() if amount > 0)
        for node in nodes
    )


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(resource, 0.0) + EPSILON >= amount for resource, amount in bundle.items())


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {resource}" for resource, amount in resources.items())


def current_cluster() -> Cluster | None:
    """The connected Ray cluster as `unfit` reads it: an autoscaler's reported maximum where there is one,
    else what is there now; None where an autoscaler runs but reported no maximum (nothing can be judged)."""
    import ray

    nodes = [{r: float(v) for r, v in node["Resources"].items()} for node in ray.nodes() if node.get("Alive", node.get("alive"))]
    totals = {r: float(v) for r, v in ray.cluster_resources().items()}
    groups, maximum = _autoscaler_limits()
    if maximum:
        totals = {r: max(totals.get(r, 0.0), float(maximum.get(r, 0.0))) for r in {*totals, *maximum}}
        return Cluster(totals, nodes + groups, "the autoscaler's maximum, from its node groups")
    if _autoscaler_running():
        return None
    return Cluster(totals, nodes)


def _autoscaler_limits() -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """An autoscaler's node group shapes and maximum totals, as it reported them to Ray's GCS (Ray Train V2
    reads the same record); ([], None) where none was reported."""
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
        if config is None:
            return [], None
        groups = [
            {r: float(v) for r, v in group.resources.items()}
            for group in config.node_group_configs
            for _ in range(max(0, min(group.max_count, MAX_NODES)))
        ]
        if any(group.max_count < 0 or group.max_count > MAX_NODES for group in config.node_group_configs):
            groups = []  # unbounded: judge by totals only
        return groups, state.state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: where it moved, judge by what is there now
        return [], None


def _autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes reports to this cluster: v2 through its state, v1 through its
    status record, where a node type other than the read-only one Ray gives each node of a fixed cluster shows it."""
    try:
        import ray
        from ray._private import ray_constants
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
        from ray.experimental.internal_kv import _internal_kv_get

        reply = GetClusterStatusReply()
        reply.ParseFromString(ray._private.worker.global_worker.gcs_client.get_cluster_status())
        if reply.autoscaling_state.autoscaler_state_version > 0:
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {} if status else {}
        return any(kind != format_readonly_node_type(node) for node, kind in mapping.items())
    except Exception:
        return False
