"""A raw shard is complete only when its tar holds as many samples as a parseable stats file counts.

img2dataset counts a sample as a success before writing it and writes its stats file even when
the disk is full: a stats file alone proves nothing. The download task checks each shard and
writes its outcome record last; `complete_shard_ids` is the shards with both (a listing only).
"""

import errno
import io
import tarfile

import pytest
from test_accounting import write_shard

from ingest.download import accounting
from pipeline.core import layout
from pipeline.core.rundir import RunDir, complete_shard_ids, complete_shards
from pipeline.runner import storage_error

OK = ("success", None)
NOT_FOUND = ("failed_to_download", "HTTP Error 404: Not Found")


def shard_file(name: str, suffix: str) -> str:
    return f"{layout.INGEST_SHARDS}/{name}{suffix}"


def files_of(run: RunDir, name: str) -> list[str]:
    return [file for file in run.list(layout.INGEST_SHARDS) if file.startswith(name)]


def keep_members(run: RunDir, name: str, members: int) -> None:
    """Rewrite the shard's tar with its first `members` members only: a whole tar, short of samples."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(run.read_bytes(shard_file(name, ".tar")))) as source,
        tarfile.open(fileobj=out, mode="w") as archive,
    ):
        for member in source.getmembers()[:members]:
            archive.addfile(member, source.extractfile(member))
    run.write_bytes(shard_file(name, ".tar"), out.getvalue())


def test_a_whole_shard_is_complete_once_its_outcome_is_recorded(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK, OK, NOT_FOUND])
    assert accounting.tar_samples(run, "00000") == 2
    assert complete_shard_ids(run) == set()  # stats alone: not yet checked
    outcome = accounting.record_outcome(run, "00000")
    assert outcome["succeeded"] == 2 and outcome["attempted"] == 3
    assert complete_shard_ids(run) == {0} and complete_shards(run) == ["00000.tar"]


def test_a_stats_file_without_an_outcome_record_is_not_complete(tmp_path):
    """Killed between img2dataset's stats file and the record, or a write that failed: not read by encode."""
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK])
    accounting.record_outcome(run, "00000")
    write_shard(run, 1, [OK, OK])
    assert complete_shard_ids(run) == {0} and complete_shards(run) == ["00000.tar"]


@pytest.mark.parametrize(
    "stats", [b"", b'{\n    "count": 3,\n    "succ', b"{}", b'{"count": 3}', b'{"count": 3, "successes": "2"}']
)
def test_a_stats_file_that_is_empty_cut_short_or_lacks_counts_never_counts(tmp_path, stats):
    """An empty stats file (ENOSPC while img2dataset wrote it) is refused and removed, and a rerun
    reads the run: the outcome of the other shards, the broken one left to download again."""
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK])
    accounting.record_outcome(run, "00000")
    write_shard(run, 1, [OK, OK, NOT_FOUND])
    run.write_bytes(shard_file("00001", layout.SHARD_STATS_SUFFIX), stats)

    with pytest.raises(accounting.ShardWriteError, match="shard 00001: write error: its stats file"):
        accounting.record_outcome(run, "00001")
    assert files_of(run, "00001") == []  # removed: a rerun downloads it again
    assert complete_shard_ids(run) == {0}

    write_shard(run, 1, [OK, OK, NOT_FOUND])
    run.write_bytes(shard_file("00001", layout.SHARD_STATS_SUFFIX), stats)
    outcomes = accounting.read_outcomes(run)  # what a resumed driver reads: no error, the broken shard left out
    assert sorted(outcomes) == [0] and files_of(run, "00001") == []
    assert accounting.run_stats(run)["shards"] == 1


def test_a_tar_with_fewer_samples_than_its_stats_count_is_refused(tmp_path):
    """img2dataset counted the sample a failed write never put in the tar."""
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK, OK, OK])
    keep_members(run, "00000", 6)  # 2 of the 3 samples (jpg, txt, json each)
    assert accounting.tar_samples(run, "00000") == 2
    with pytest.raises(accounting.ShardWriteError, match="its tar holds 2 sample\\(s\\), its stats file counts 3"):
        accounting.record_outcome(run, "00000")
    assert files_of(run, "00000") == [] and complete_shard_ids(run) == set()


def test_a_tar_cut_short_mid_member_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK, OK, OK])
    whole = run.read_bytes(shard_file("00000", ".tar"))
    run.write_bytes(shard_file("00000", ".tar"), whole[: 512 * 9 + 3])  # inside the fourth member's header
    with pytest.raises(accounting.ShardWriteError, match="write error"):
        accounting.check_shard(run, "00000")
    assert accounting.verified_outcome(run, "00000") is None and files_of(run, "00000") == []


def test_a_missing_tar_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK])
    run.remove(shard_file("00000", ".tar"))
    with pytest.raises(accounting.ShardWriteError, match="no tar"):
        accounting.record_outcome(run, "00000")


def test_verified_outcome_keeps_a_whole_shard_finished_before_its_record(tmp_path):
    run = RunDir(tmp_path / "run")
    assert accounting.verified_outcome(run, "00000") is None  # nothing there: download it
    write_shard(run, 0, [OK, NOT_FOUND])
    tar = run.read_bytes(shard_file("00000", ".tar"))
    outcome = accounting.verified_outcome(run, "00000")
    assert outcome is not None and outcome["succeeded"] == 1 and outcome["failed"] == {"http_error": 1}
    assert run.read_json(accounting.outcome_path("00000")) == outcome
    assert run.read_bytes(shard_file("00000", ".tar")) == tar and complete_shard_ids(run) == {0}


def test_a_write_error_removes_the_shard_and_raises_the_storage_error_naming_its_tar(tmp_path):
    run = RunDir(tmp_path / "run")
    accounting.raise_write_error(run, "00000", None)  # no error: nothing happens
    write_shard(run, 0, [OK, OK])
    with pytest.raises(OSError) as raised:
        accounting.raise_write_error(run, "00000", OSError(errno.ENOSPC, "No space left on device"))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == run.path(shard_file("00000", ".tar"))
    assert storage_error(RuntimeError("wrapped")) is None
    assert storage_error(raised.value) is raised.value  # the runner's one line: the path and the reason
    assert files_of(run, "00000") == []


def test_the_writer_keeps_the_write_error_img2dataset_swallows(tmp_path, monkeypatch):
    import pyarrow as pa

    from ingest.download import shard_writer

    schema = pa.schema([("key", pa.string()), ("status", pa.string())])
    writer = shard_writer.CheckedSampleWriter(3, str(tmp_path), True, 5, schema, "jpg")
    writer.write(b"image", "000030000", "a caption", {"key": "000030000", "status": "success"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.tarwriter, "write", full)
    with pytest.raises(OSError):  # img2dataset catches this one, prints it and goes on
        writer.write(b"image", "000030001", "a caption", {"key": "000030001", "status": "success"})
    monkeypatch.undo()
    writer.close()
    error = shard_writer.take_error(3)
    assert error is not None and error.errno == errno.ENOSPC
    assert shard_writer.take_error(3) is None  # taken once


def test_a_shard_whose_files_disagree_on_every_try_is_counted_as_a_write_error():
    import ray

    from ingest.download import distribute

    error = accounting.ShardWriteError("shard 00002: write error: its tar holds 12 sample(s), its stats file counts 30")
    raised = ray.exceptions.RayTaskError("_shard_task", "Traceback ...", error)
    assert distribute.shard_failure(raised.as_instanceof_cause()) == "write_error"
