"""A full, read-only, forbidden or misplaced output location fails with one clear line naming
the path and the stage, and run.json records the stage as failed with that error.

Real filesystems where they can be had: a path under a regular file (ENOTDIR, anywhere), and
small tmpfs mounts (ENOSPC, EROFS; skipped where `mount` is not permitted). Root ignores file
modes, so EACCES is raised by a stand-in stage. The real encode stage on a full disk shows the
same line through Ray Data's wrappers.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess

import pytest
from typer.testing import CliRunner

from pipeline import cli, runner
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size, read_only=False) -> an empty tmpfs folder, unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str, read_only: bool = False):
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=False, capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def fake_stages(monkeypatch):
    """Stand-in stages: each writes `sizes.get(name, 1)` bytes under its folder, or raises `raising[name]`."""
    sizes, raising = {}, {}

    def make(name):
        def stage(config, run):
            if name in raising:
                raise RuntimeError(f"{name} broke") from raising[name]
            run.write_bytes(f"{name}/out.bin", bytes(sizes.get(name, 1)))
            return {"counts": {"n": 1}}

        return stage

    monkeypatch.setattr(runner, "stage_function", make)
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)
    return sizes, raising


def pipeline_run(out) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli.app, ["run", "--preset", "tiny", "--out", str(out)])
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def test_out_under_a_regular_file_fails_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, lines = pipeline_run(tmp_path / "file" / "run")
    assert code == 2
    assert lines == [f"cannot write the run directory {tmp_path}/file/run: Not a directory"]


def test_a_read_only_out_fails_with_one_line(mount_tmpfs):
    folder = mount_tmpfs("ro", "1M", read_only=True)
    code, lines = pipeline_run(folder / "run")
    assert code == 2
    assert lines == [f"cannot write the run directory {folder}/run: Read-only file system"]


def test_a_full_disk_fails_the_stage_and_run_json_says_so(mount_tmpfs, fake_stages):
    sizes, _ = fake_stages
    folder = mount_tmpfs("full", "1M")
    sizes["encode"] = 2 * 1024 * 1024
    code, lines = pipeline_run(folder / "run")
    expected = f"stage 'encode' failed on {folder}/run/encode: No space left on device"
    assert code == 2 and lines[-1] == expected and not any("Traceback" in line for line in lines)
    stages = RunDir(folder / "run").manifest()["stages"]
    assert stages["ingest"]["status"] == "done"
    assert stages["encode"]["status"] == "failed" and stages["encode"]["error"] == expected
    assert "train" not in stages  # nothing ran after it
    assert os.listdir(folder / "run" / "encode") == []  # the partial file was removed, freeing the space


@pytest.mark.parametrize(
    "number, text",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EACCES, "Permission denied"),
        (errno.EROFS, "Read-only file system"),
        (errno.ENOTDIR, "Not a directory"),
    ],
)
def test_each_storage_error_names_the_path_and_the_stage(tmp_path, fake_stages, number, text):
    _, raising = fake_stages
    raising["train"] = OSError(number, text, "/data/run/train/checkpoints/x")
    config = load_config("tiny")
    run = RunDir(tmp_path / "run")
    with pytest.raises(runner.StageError) as error:
        runner.run_stages(config, run)
    message = f"stage 'train' failed on /data/run/train/checkpoints/x: {text}"
    assert str(error.value) == message
    assert run.stage("train")["status"] == "failed" and run.stage("train")["error"] == message


def test_other_errors_still_propagate_as_they_are(tmp_path, fake_stages):
    _, raising = fake_stages
    raising["encode"] = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")  # an input, not the output
    with pytest.raises(RuntimeError, match="encode broke"):
        runner.run_stages(load_config("tiny"), RunDir(tmp_path / "run"))
    assert RunDir(tmp_path / "run").stage("encode")["error"] == "RuntimeError: encode broke"


@pytest.mark.timeout(300)
def test_the_encode_stage_on_a_full_disk_fails_with_one_line(mount_tmpfs, ray_local):
    from webdataset import TarWriter

    from pipeline.core.toy import generate

    folder = mount_tmpfs("encode", "2M")
    config = load_config("tiny", overrides=["encode.batch_size=8", "encode.num_actors=1"])
    run = RunDir(folder / "run")
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for index, (spec, image) in enumerate(generate(40, 64, 0)):
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG")
            writer.write({"__key__": f"{index:06d}", "jpg": jpeg.getvalue(), "txt": spec.caption.encode(), "json": b"{}"})
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.tar", buffer.getvalue())
    run.write_json(f"{layout.INGEST_SHARDS}/00000{layout.SHARD_STATS_SUFFIX}", {"successes": 40})
    run.update_stage("ingest", status="done", fingerprint=runner.fingerprints(config)["ingest"][0])
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    (folder / "filler").write_bytes(bytes(free - 60_000))  # room for records, not for 40 samples' latents (~400 kB)

    with pytest.raises(runner.StageError) as error:
        runner.run_stages(config, run, stages=["encode"])
    message = f"stage 'encode' failed on {run.path('encode')}: No space left on device"
    assert str(error.value) == message
    assert run.stage("encode")["status"] == "failed" and run.stage("encode")["error"] == message
