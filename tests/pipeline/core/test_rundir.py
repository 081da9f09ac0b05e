import os

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
