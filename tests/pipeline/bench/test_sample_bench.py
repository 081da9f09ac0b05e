"""`pipeline bench sample`: the fewest steps at which each scheduler matches the DDPM reference,
on a synthetic run with random tiny models (accuracy ~0, so the JSON's shape is what is checked)."""

import pytest
from sample_support import PROMPTS, sample_config
from typer.testing import CliRunner

from pipeline import cli as pipeline_cli
from pipeline.bench import sample as bench_sample
from pipeline.bench.sample import SCHEDULERS, first_hit, run_bench, search_all
from pipeline.core import layout
from pipeline.core.config import PipelineConfig, to_toml

LADDER = (4, 1, 2, 40)  # unsorted, and 40 is past the reference: the bench sorts and drops it
DDPM_STEPS = 20
SEEDS = (0, 1)


@pytest.fixture
def bench_run(synthetic_run, model_dirs):
    synthetic_run.write_text(layout.CONFIG, to_toml(sample_config(model_dirs)))
    return synthetic_run


def check_entries(report: dict) -> None:
    assert set(report["per_scheduler"]) == set(SCHEDULERS)
    threshold = report["reference_accuracy"] - report["tolerance"]
    best = None  # the fewest steps of the schedulers before: later ones walk only the rungs below it
    for name in SCHEDULERS:
        entry = report["per_scheduler"][name]
        assert entry["below"] == best, name
        rungs = [steps for steps in report["ladder"] if best is None or steps < best]
        ladder = {int(steps): accuracy for steps, accuracy in entry["ladder"].items()}
        assert list(ladder) == rungs[: len(ladder)], name  # walked up in order, from the bottom
        assert all(0 <= accuracy <= 1 for accuracy in ladder.values())
        if entry["steps"] is None:  # no hit: every rung below the best tried, none close enough
            assert list(ladder) == rungs and entry["accuracy"] is None and entry["seconds"] is None
            assert all(accuracy < threshold for accuracy in ladder.values())
        else:  # stopped at the first hit
            assert max(ladder) == entry["steps"] and entry["accuracy"] == ladder[entry["steps"]] >= threshold
            assert all(accuracy < threshold for steps, accuracy in ladder.items() if steps < entry["steps"])
            assert entry["seconds"] > 0 and entry["search_seconds"] >= entry["seconds"]
            best = entry["steps"]


def test_bench_finds_the_first_hit_per_scheduler_and_the_speedup(bench_run):
    report = run_bench(run=bench_run.url, seeds=SEEDS, ddpm_steps=DDPM_STEPS, ladder=LADDER)
    assert report["bench"] == "sample" and report["device"] == "cpu" and report["threads"] == 1
    assert report["ddpm_steps"] == DDPM_STEPS and report["ladder"] == [1, 2, 4]
    assert report["checkpoint"] == 20 and report["seeds"] == list(SEEDS) and report["guidance_scale"] == 7.5
    # The schedulers use the config's guidance rescale; the 1000-step reference plain guidance.
    assert report["guidance_rescale"] == 0.7 and report["reference_guidance_rescale"] == 0.0
    default = report["config_sampler"]  # the config's ddim at 2 steps (sample_config)
    assert (default["scheduler"], default["steps"]) == ("ddim", 2) and 0 <= default["accuracy"] <= 1
    assert default["within_tolerance"] == (default["accuracy"] >= report["reference_accuracy"] - report["tolerance"] - 1e-9)
    assert report["images"] == len(PROMPTS) * len(SEEDS) and report["timestep_spacing"] == "trailing"
    assert 0 <= report["reference_accuracy"] <= 1 and report["reference_seconds"] > 0
    check_entries(report)

    hits = {name: entry["steps"] for name, entry in report["per_scheduler"].items() if entry["steps"] is not None}
    assert hits  # random models score ~0, so every scheduler is within 0.05 of the reference early
    best = min(hits.values())
    assert report["speedup"] == DDPM_STEPS / best
    fastest = report["fastest"]
    assert hits[fastest["scheduler"]] == fastest["steps"] == best
    assert fastest["seconds"] == report["per_scheduler"][fastest["scheduler"]]["seconds"]
    assert fastest["images_per_s"] == pytest.approx(report["images"] / fastest["seconds"], rel=0.01)


def test_bench_without_a_hit_reports_every_rung_and_no_speedup(bench_run):
    # A negative tolerance puts the bar above any accuracy: nothing can reach it.
    report = run_bench(run=bench_run.url, seeds=(0,), ddpm_steps=4, ladder=(1, 2), tolerance=-2.0, schedulers=("ddim",))
    assert report["speedup"] is None and report["fastest"] is None and report["wall_speedup"] is None
    assert report["per_scheduler"]["ddim"]["steps"] is None and list(report["per_scheduler"]["ddim"]["ladder"]) == ["1", "2"]


def test_later_schedulers_walk_only_the_rungs_below_the_best_hit_so_far():
    bars = {"slow": 30, "fast": 8, "never": 99, "faster": 3}  # the fewest steps each reaches the bar in
    calls = []

    def measure(name, steps):
        calls.append((name, steps))
        return (1.0 if steps >= bars[name] else 0.0), 0.1

    entries = search_all(measure, tuple(bars), [1, 2, 4, 8, 10, 30, 40], threshold=0.5)
    assert {name: entry["steps"] for name, entry in entries.items()} == {"slow": 30, "fast": 8, "never": None, "faster": 4}
    assert {name: entry["below"] for name, entry in entries.items()} == {"slow": None, "fast": 30, "never": 8, "faster": 8}
    assert [steps for name, steps in calls if name == "never"] == [1, 2, 4]  # stopped below "fast"'s 8
    assert [steps for name, steps in calls if name == "fast"] == [1, 2, 4, 8]
    assert len(calls) == 6 + 4 + 3 + 3


def test_the_ladder_ends_where_speedup_25_is_out_of_reach_and_the_default_scheduler_runs_first():
    assert max(bench_sample.LADDER) == bench_sample.DDPM_STEPS // 25 == 40
    assert SCHEDULERS[0] == PipelineConfig().sample.scheduler


def test_first_hit_stops_at_the_first_rung_that_reaches_the_bar_even_if_a_later_one_falls():
    accuracies = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.95}
    steps, seen = first_hit(lambda n: (accuracies[n], 0.1), [1, 2, 3, 4], threshold=0.8)
    assert steps == 2 and list(seen) == [1, 2]
    assert first_hit(lambda n: (accuracies[n], 0.1), [1, 3], threshold=0.8) == (None, {1: (0.2, 0.1), 3: (0.5, 0.1)})


def test_cli_fails_clearly_without_a_trained_run(tmp_path):
    """`pipeline bench` in this process (typer's CliRunner): failing early needs no fresh interpreter."""
    missing = tmp_path / "no-such-run"
    result = CliRunner().invoke(pipeline_cli.app, ["bench", "sample", "--run", str(missing)])
    assert result.exit_code == 2, result.output[-3000:]
    assert str(missing / layout.CONFIG) in result.output and "make demo" in result.output
    assert not missing.exists()  # nothing trained or written

    result = CliRunner().invoke(pipeline_cli.app, ["bench", "encode", "--run", str(missing)])
    assert result.exit_code == 2 and "bench encode takes no --run" in result.output
