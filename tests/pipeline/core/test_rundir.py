import os
import uuid

import pytest

from pipeline.core import layout
from pipeline.core.rundir import RunDir


def test_local_paths_and_file_urls_are_the_same_run(tmp_path):
    assert RunDir(tmp_path).url == RunDir(f"file://{tmp_path}").url == str(tmp_path)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("a/b.json", {"x": 1})
    run.write_json("a/b.json", {"x": 2})
    assert run.read_json("a/b.json") == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_committed_steps_ignore_folders_without_marker(tmp_path):
    run = RunDir(tmp_path)
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"1")
    run.put_dir(source, f"export/{layout.step_name(5)}")
    (tmp_path / "export" / layout.step_name(9)).mkdir()  # a half-written one
    assert run.committed_steps("export") == [5]
    assert (tmp_path / "export" / "step-0000005" / "weights.bin").read_bytes() == b"1"


def test_manifest_updates_merge_per_stage(tmp_path):
    run = RunDir(tmp_path)
    assert run.stage("ingest") == {"status": "pending"}
    run.update_stage("ingest", status="running", started="t0")
    run.update_stage("ingest", status="done")
    run.update_stage("encode", status="running")
    manifest = run.manifest()
    assert manifest["stages"]["ingest"] == {"status": "done", "started": "t0"}
    assert manifest["stages"]["encode"]["status"] == "running"


def test_works_on_other_fsspec_filesystems():
    run = RunDir("memory://runs/one")
    run.write_json("run.json", {"stages": {}})
    assert run.url == "memory:///runs/one"
    assert run.list("") == ["run.json"]


def test_put_dir_replaces_an_existing_folder_whole(tmp_path):
    run = RunDir(tmp_path / "run")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "old.bin").write_bytes(b"old")
    (second / "new.bin").write_bytes(b"new")
    run.put_dir(first, "export/step-0000001")
    run.put_dir(second, "export/step-0000001")
    assert sorted(os.listdir(tmp_path / "run" / "export" / "step-0000001")) == ["COMMITTED", "new.bin"]
    assert os.listdir(tmp_path / "run" / "export") == ["step-0000001"]


def test_s3_listings_see_what_another_process_wrote(s3_server):
    """s3fs caches listings for good; objects another process (here boto3) writes must still show."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="rundir-fresh")

    def put(key: str, body: bytes = b"1") -> None:
        s3.put_object(Bucket="rundir-fresh", Key=f"run/{key}", Body=body)

    run = RunDir("s3://rundir-fresh/run")
    run.write_json(layout.RUN_MANIFEST, {"stages": {}})
    run.write_text(f"export/{layout.step_name(1)}/{layout.COMMIT_MARKER}", "t\n")
    put(f"export/{layout.step_name(3)}/weights.bin")  # not committed yet
    put("shards/00000.tar")
    # fill the listing cache: the run's root, and every folder the checks below read
    assert run.list("") == ["export", "run.json", "shards"]
    assert run.list("export") == [layout.step_name(1), layout.step_name(3)]
    assert run.list(f"export/{layout.step_name(3)}") == ["weights.bin"]
    assert run.list("shards") == ["00000.tar"]
    assert run.committed_steps("export") == [1]
    assert "rundir-fresh/run/shards" in run.fs.dircache  # the cache the checks below must not trust

    put(f"export/{layout.step_name(2)}/{layout.COMMIT_MARKER}")
    put(f"export/{layout.step_name(3)}/{layout.COMMIT_MARKER}")
    put("shards/00001.tar")
    put("scratch/leftover.bin")
    put(layout.RUN_MANIFEST, b'{"stages": {"ingest": {"status": "done"}}}')

    assert run.list("") == ["export", "run.json", "scratch", "shards"]
    assert run.list("shards") == ["00000.tar", "00001.tar"]
    assert run.exists("shards/00001.tar")
    assert run.exists("scratch")
    assert run.committed_steps("export") == [1, 2, 3]
    assert run.stage("ingest") == {"status": "done"}  # the rewritten manifest, not its cached size
    run.remove("scratch")
    assert "Contents" not in s3.list_objects_v2(Bucket="rundir-fresh", Prefix="run/scratch/")


@pytest.mark.parametrize("name", ["../victim", "shards/../../victim", "/tmp/victim", "s3://bucket/victim", "a\0b"])
def test_no_path_outside_the_run_is_read_written_or_removed(tmp_path, name):
    """Names read from records (shards, parts) reach these calls: none may leave the run."""
    (tmp_path / "victim").write_text("kept")
    run = RunDir(tmp_path / "run")
    for call in (
        run.remove,
        run.read_bytes,
        run.exists,
        lambda path: run.write_text(path, "x"),
        lambda path: run.move(path, "y"),
    ):
        with pytest.raises(ValueError, match="not a path inside"):
            call(name)
    assert (tmp_path / "victim").read_text() == "kept"


def test_paths_that_stay_inside_are_normalised(tmp_path):
    run = RunDir(tmp_path)
    run.write_text("encode/shards/../progress/a.json", "{}")
    assert (tmp_path / "encode" / "progress" / "a.json").exists()
    run.move("encode/progress", "encode.superseded-1/progress")
    assert (tmp_path / "encode.superseded-1" / "progress" / "a.json").exists()


def test_move_on_an_object_store_keeps_every_file():
    run = RunDir(f"memory://move-{uuid.uuid4().hex[:6]}")
    run.write_text("train/checkpoints/step-0000002/COMMITTED", "t")
    run.write_text("train/export/a.json", "{}")
    run.move("train", "train.superseded-x")
    assert run.list("train") == []
    assert run.read_text("train.superseded-x/checkpoints/step-0000002/COMMITTED") == "t"
    assert run.read_text("train.superseded-x/export/a.json") == "{}"


def test_a_stage_set_aside_and_the_lease_on_a_real_s3_server(s3_server):
    """What the runner does on an object store: move a stage's folder aside whole; hold the run's lease."""
    import boto3

    from pipeline.core.lease import Lease, LeaseHeld

    boto3.client("s3").create_bucket(Bucket="rundir-aside")
    run = RunDir("s3://rundir-aside/run")
    run.write_text(f"train/checkpoints/{layout.step_name(4)}/{layout.COMMIT_MARKER}", "t\n")
    run.write_text("train/metrics.jsonl", "{}\n")
    run.move("train", "train.superseded-x")
    assert run.list("train") == [] and run.committed_steps("train.superseded-x/checkpoints") == [4]
    first = Lease(run, "pipeline run first").acquire()
    try:
        with pytest.raises(LeaseHeld, match="pipeline run first"):
            Lease(run, "pipeline run second").acquire()
    finally:
        first.release()
    assert not run.exists(layout.LEASE)
    Lease(run).acquire().release()
