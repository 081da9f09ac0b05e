"""Stand-in stages for the runner's tests (tests/pipeline/test_runner.py, core/test_lease.py)."""

import pytest

from pipeline import runner


@pytest.fixture
def fake_stages(monkeypatch, ray_local):
    """Each stage records its call and writes NAME/out.txt; `fail[name] = n` makes it raise n times. (calls, fail).

    The runner's resource pre-flight reads the session's Ray (`ray_local`), which it would otherwise start itself."""
    calls = []
    fail = {}

    def make(name):
        def stage(config, run):
            calls.append(name)
            if fail.get(name):
                fail[name] -= 1
                raise RuntimeError(f"{name} broke")
            run.write_text(f"{name}/out.txt", "x")
            return {"counts": {"n": 1}}

        return stage

    monkeypatch.setattr(runner, "stage_function", make)
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)
    return calls, fail
