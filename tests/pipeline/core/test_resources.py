"""A stage's Ray request is compared with the cluster before it starts (pipeline.core.resources): one that can
never be granted fails at once naming the keys and both numbers, instead of Ray waiting for it forever."""

from __future__ import annotations

import pytest

from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.resources import Cluster, current_cluster, stage_asks, unfit
from pipeline.core.rundir import RunDir
from pipeline.runner import StageError, refuse_unfit, run_stages

EIGHT_GPUS = Cluster({"CPU": 128.0, "GPU": 8.0}, [{"CPU": 64.0, "GPU": 4.0}, {"CPU": 64.0, "GPU": 4.0}])


def test_the_large_preset_on_8_gpus_names_train_num_workers_and_the_most_that_fit():
    config = load_config("sd15-256", overrides=["train.cpus_per_worker=1"])
    assert (config.train.num_workers, config.train.use_gpu) == (64, True)
    assert unfit("train", config, EIGHT_GPUS) == (
        "stage 'train' cannot start: it asks for 64 GPUs at once: 64 (train.num_workers = 64 x (train.cpus_per_worker = 1, "
        "one GPU each: train.use_gpu)), but the cluster has 8 (ray.cluster_resources()); set train.num_workers to at "
        "most 8 (--set train.num_workers=8), or use a larger cluster"
    )
    fitted = load_config("sd15-256", overrides=["train.cpus_per_worker=1", "train.num_workers=8"])
    assert unfit("train", fitted, EIGHT_GPUS) is None


def test_cpus_count_too_and_the_way_out_is_what_fits():
    config = load_config("sd15-256", overrides=["train.num_workers=8"])  # 8 CPUs each
    cluster = Cluster({"CPU": 40.0, "GPU": 8.0}, [{"CPU": 20.0, "GPU": 4.0}] * 2)
    reason = unfit("train", config, cluster)
    assert "asks for 64 CPUs at once" in reason and "the cluster has 40" in reason
    assert reason.endswith("set train.num_workers to at most 4 (--set train.num_workers=4), or use a larger cluster")


def test_encoder_actors_leave_room_for_a_decode_task_or_they_wait_for_batches_forever():
    config = load_config("tiny", overrides=["encode.num_actors=4", "encode.cpus_per_actor=0.5", "encode.cpus_per_decode_task=1"])
    two_cpus = Cluster({"CPU": 2.0}, [{"CPU": 2.0}])
    reason = unfit("encode", config, two_cpus)
    assert "asks for 3 CPUs at once: 2 (encode.num_actors = 4 x (encode.cpus_per_actor = 0.5)) + 1 (encode" in reason
    assert reason.endswith("set encode.num_actors to at most 2 (--set encode.num_actors=2), or use a larger cluster")
    assert unfit("encode", load_config("tiny", overrides=["encode.num_actors=2"]), two_cpus) is None


def test_a_bundle_must_fit_on_one_node():
    config = load_config("sd15-256", overrides=["encode.num_actors=1", "encode.cpus_per_actor=96"])
    reason = unfit("encode", config, EIGHT_GPUS)
    assert reason.startswith("stage 'encode' cannot start: each encoder actor asks for 96 CPU, 1 GPU on one node")
    assert "but the largest node has 64 CPU, 4 GPU" in reason
    gpu_on_cpus = unfit("train", load_config("tiny", overrides=["train.use_gpu=true"]), Cluster({"CPU": 2.0}, [{"CPU": 2.0}]))
    assert "1 GPU on one node" in gpu_on_cpus and "the largest node has 1 CPU, 0 GPU" not in gpu_on_cpus
    assert "0 GPU" in gpu_on_cpus


def test_whole_workers_must_pack_onto_the_nodes_even_where_the_totals_fit():
    config = load_config("sd15-256", overrides=["train.num_workers=5"])  # 8 CPUs and 1 GPU each: 40 CPUs
    two_nodes = Cluster({"CPU": 40.0, "GPU": 8.0}, [{"CPU": 20.0, "GPU": 4.0}] * 2)  # 2 workers on each
    reason = unfit("train", config, two_nodes)
    assert "its 5 training workers (train.num_workers = 5 x" in reason and "but only 4 fit on its nodes" in reason
    assert reason.endswith("--set train.num_workers=4), or use a larger cluster")


def test_sample_and_report_ask_ray_for_nothing():
    config = load_config("sd15-256")
    assert stage_asks("sample", config) == stage_asks("report", config) == []
    assert unfit("sample", config, Cluster({})) is None


@pytest.mark.timeout(120)
def test_a_run_too_big_for_the_local_cluster_is_refused_before_any_stage_starts(tmp_path, ray_local):
    """The session's real 2-CPU Ray: training 3 one-CPU workers would wait forever, after ingest and encode ran."""
    run = RunDir(tmp_path / "run")
    config = load_config("tiny", overrides=["train.num_workers=3"])
    with pytest.raises(StageError) as refused:
        run_stages(config, run)
    message = str(refused.value)
    assert message.startswith("stage 'train' cannot start: it asks for 3 CPUs at once: 3 (train.num_workers = 3 x")
    assert "the cluster has 2 (ray.cluster_resources())" in message and "--set train.num_workers=2" in message
    assert "\n" not in message and message.endswith("--set ray.check_resources=false)")
    assert run.manifest()["stages"] == {} and not run.exists(layout.INGEST_SHARDS)  # nothing started
    # Where an autoscaler Ray does not know of would add nodes, the check can be turned off.
    refuse_unfit(load_config("tiny", overrides=["train.num_workers=3", "ray.check_resources=false"]), ["train"], True)
    # Checked again before each stage (nodes may have gone): then only that stage is held back.
    with pytest.raises(StageError, match=r"\. Stage 'train' was not started \(where"):
        refuse_unfit(config, ["train"], before_any=False)


@pytest.mark.timeout(120)
def test_an_autoscalers_reported_maximum_counts_as_the_cluster(ray_local):
    """As an autoscaler reports its node groups to Ray's GCS (what Ray Train V2 reads too): up to 2 nodes of 4 GPUs."""
    from ray._private.worker import global_worker
    from ray.core.generated import autoscaler_pb2

    now = current_cluster()
    assert now is not None and now.totals["CPU"] == 2.0 and now.source == "ray.cluster_resources()"
    reported = autoscaler_pb2.ClusterConfig()
    group = reported.node_group_configs.add(name="gpu-workers", max_count=2)
    group.resources.update({"CPU": 32, "GPU": 4})
    global_worker.gcs_client.report_cluster_config(reported.SerializeToString())
    try:
        grown = current_cluster()
        assert grown.totals["GPU"] == 8.0 and grown.totals["CPU"] == 64.0 and "autoscaler" in grown.source
        eight = load_config("sd15-256", overrides=["train.num_workers=8", "train.cpus_per_worker=4"])
        assert unfit("train", eight, grown) is None
        sixteen = unfit("train", load_config("sd15-256", overrides=["train.num_workers=16", "train.cpus_per_worker=4"]), grown)
        assert "asks for 16 GPUs at once" in sixteen and "the cluster has 8 (the autoscaler's maximum" in sixteen
    finally:
        global_worker.gcs_client.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    assert current_cluster().source == "ray.cluster_resources()"
