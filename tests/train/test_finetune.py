"""Fine-tuning (train.init_from, train.freeze): a real 2-worker run started from another run's
export, with frozen parameters left bit-identical, and the driver's fail-fast checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from synthetic_latents import TEXT_SHAPE, write_latent_run

from pipeline import runner
from pipeline.core import layout
from pipeline.core.config import load_config
from train import finetune
from train.ema import ExponentialMovingAverage, weights_replaced
from train.stage import TrainStageError, check_inputs, run_stage
from train.unet import build_unet, parameter_count

OVERRIDES = [
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.zero_stage=2",
    "train.batch_size_per_worker=8",
    "train.warmup_steps=0",
    'train.lr_schedule="constant"',
    "train.log_every=1",
]
# Everything but the decoder's blocks.
FREEZE = ["conv_in", "time_embedding", "down_blocks", "mid_block", "conv_norm_out", "conv_out"]


def config(max_steps: int, *overrides: str):
    return load_config(
        "tiny", overrides=[*OVERRIDES, f"train.max_steps={max_steps}", f"train.checkpoint_every={max_steps}", *overrides]
    )


def weights(folder) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True).state_dict()


def save_unet(folder: Path, cross_attention_dim: int = TEXT_SHAPE[1], seed: int = 0, prediction_type: str | None = None) -> Path:
    """A tiny UNet saved like an export: unet/ (and scheduler/ when `prediction_type` is given)."""
    torch.manual_seed(seed)
    build_unet("tiny", cross_attention_dim=cross_attention_dim, sample_size=8).save_pretrained(folder / "unet")
    if prediction_type:
        DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def base_export(tmp_path_factory, ray_local) -> Path:
    """A 3-step ZeRO-2 run's export folder (step-0000003)."""
    run = write_latent_run(tmp_path_factory.mktemp("base") / "run")
    run_stage(config(3), run)
    return Path(run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(3)}"))


def exported(run, step: int, unet: str = layout.EXPORT_UNET) -> dict[str, torch.Tensor]:
    return weights(Path(run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}")) / unet)


@pytest.mark.e2e
# ZeRO-3, where frozen parameters are partitioned too; the LoRA test below freezes the whole base under ZeRO-2.
@pytest.mark.parametrize("zero_stage", [3])
def test_finetuning_starts_from_the_export_and_trains_only_the_unfrozen_parameters(tmp_path, base_export, zero_stage):
    initial = weights(base_export / layout.EXPORT_UNET)  # the export's EMA weights: what sampling loads
    overrides = [f'train.init_from="{base_export}"', f"train.freeze={FREEZE}", f"train.zero_stage={zero_stage}"]
    init = finetune.resolve(config(2, *overrides).train)
    assert init.folder == base_export / layout.EXPORT_UNET

    run = write_latent_run(tmp_path / "run", seed=1)  # other latents
    summary = run_stage(config(2, *overrides), run)

    assert summary["steps"] == 2 and summary["exports"] == [0, 2]  # step 0: the init weights, for validation
    for unet in (layout.EXPORT_UNET, layout.EXPORT_UNET_ONLINE):
        assert all(torch.equal(value, initial[name]) for name, value in exported(run, 0, unet).items())
    frozen = {name for name in initial if any(finetune.matches(name, pattern) for pattern in FREEZE)}
    assert frozen and len(frozen) < len(initial)
    counts = summary["parameters"]
    assert counts["frozen"] == sum(initial[name].numel() for name in frozen)
    assert counts["trainable"] + counts["frozen"] == counts["total"] == sum(v.numel() for v in initial.values())
    assert summary["init"]["folder"] == str(init.folder) and summary["init"]["sha256"] == init.sha256()
    for unet in (layout.EXPORT_UNET, layout.EXPORT_UNET_ONLINE):  # the average covers the trainable ones only
        tuned = exported(run, 2, unet)
        for name, value in initial.items():
            assert torch.equal(tuned[name], value) == (name in frozen), f"{unet}: {name}"
    # The export's schedule is the init's (both from the tiny preset), so it samples alike.
    scheduler = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(2)}/{layout.EXPORT_SCHEDULER}")
    assert DDPMScheduler.load_config(scheduler)["prediction_type"] == "v_prediction"

    resumed = run_stage(config(4, *overrides), run)  # a resume restores the frozen ones too, partitioned
    assert resumed["steps"] == 4 and resumed["resumed_from"] == [2] and resumed["exports"] == [0, 2, 4]
    online = exported(run, 4, layout.EXPORT_UNET_ONLINE)
    assert all(torch.equal(online[name], initial[name]) == (name in frozen) for name in initial)


def test_the_init_model_is_part_of_the_train_fingerprint(tmp_path):
    folder = save_unet(tmp_path / "model")
    tuned = load_config("tiny", overrides=[f'train.init_from="{folder}"'])
    before = runner.fingerprints(tuned)
    assert before["train"] != runner.fingerprints(load_config("tiny"))["train"]
    assert runner.fingerprints(tuned) == before
    save_unet(tmp_path / "model", seed=1)  # other weights under the same name: train again, not resume
    after = runner.fingerprints(tuned)
    assert after["ingest"] == before["ingest"] and after["encode"] == before["encode"]
    assert after["train"][0] != before["train"][0] and after["train"][1] != before["train"][1]
    assert after["sample"] != before["sample"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "cross_attention_dim",
            32,
            f"cross_attention_dim = 32 in the init model {{folder}}, but the text embeddings are {TEXT_SHAPE[1]} wide",
        ),
        ("in_channels", 3, "in_channels = 3 in the init model {folder}, but the latents have 4 channels"),
    ],
)
def test_an_init_model_that_does_not_fit_the_latents_fails_before_any_worker_starts(tmp_path, key, value, expected):
    folder = save_unet(tmp_path / "model") / "unet"
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    run = write_latent_run(tmp_path / "run")
    with pytest.raises(TrainStageError) as error:
        run_stage(config(2, f'train.init_from="{folder}"'), run)  # raises in the driver: no Ray cluster here
    assert expected.format(folder=folder) in str(error.value)


def test_another_prediction_type_than_the_init_models_fails_naming_both(tmp_path):
    folder = save_unet(tmp_path / "export", prediction_type="epsilon")
    run = write_latent_run(tmp_path / "run")
    with pytest.raises(TrainStageError) as error:
        check_inputs(config(2, f'train.init_from="{folder}"'), run)  # the tiny preset predicts v
    assert f"train.prediction_type = 'v_prediction', but {folder / 'scheduler'} says prediction_type = 'epsilon'" in str(
        error.value
    )
    # An epsilon model of the cosine schedule samples with leading spacing (trailing is refused for it).
    check_inputs(
        config(2, f'train.init_from="{folder}"', 'train.prediction_type="epsilon"', 'sample.timestep_spacing="leading"'), run
    )


def test_stable_diffusion_betas_are_settable_and_checked(tmp_path):
    """SD-1.5's schedule: scaled_linear from 0.00085 to 0.012, not diffusers' default betas."""
    folder = tmp_path / "sd"
    save_unet(folder)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    run = write_latent_run(tmp_path / "run")
    sd = [f'train.init_from="{folder}"', 'train.prediction_type="epsilon"', 'train.noise_schedule="scaled_linear"']
    with pytest.raises(TrainStageError, match="train.beta_start = 0.0001, but .* says beta_start = 0.00085"):
        check_inputs(config(2, *sd), run)
    check_inputs(config(2, *sd, "train.beta_start=0.00085", "train.beta_end=0.012"), run)


def test_an_init_model_without_safetensors_weights_is_refused(tmp_path):
    folder = tmp_path / "model"
    build_unet("tiny", cross_attention_dim=TEXT_SHAPE[1], sample_size=8).save_pretrained(folder, safe_serialization=False)
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(TrainStageError, match="has no diffusion_pytorch_model.*safetensors"):
        check_inputs(config(2, f'train.init_from="{folder}"'), write_latent_run(tmp_path / "run"))


def test_a_missing_init_model_fails_naming_it(tmp_path):
    with pytest.raises(TrainStageError, match="'nobody/no-such-unet' is neither a local folder nor a Hugging Face model"):
        check_inputs(config(2, 'train.init_from="nobody/no-such-unet"'), write_latent_run(tmp_path / "run"))


def test_a_hugging_face_id_loads_from_the_local_cache(tmp_path, monkeypatch):
    """An SD-style repo (unet/ and scheduler/ subfolders) in the Hub cache, read offline."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    save_unet(repo / "snapshots" / commit, prediction_type="v_prediction")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tuned = config(2, 'train.init_from="someone/tiny-sd"', 'train.init_subfolder="unet"')
    summary = check_inputs(tuned, write_latent_run(tmp_path / "run"))
    assert summary["init"]["folder"] == str(repo / "snapshots" / commit / "unet")
    assert summary["parameters"]["frozen"] == 0


def test_a_freeze_entry_matching_no_parameter_fails_naming_it(tmp_path):
    run = write_latent_run(tmp_path / "run")
    with pytest.raises(TrainStageError, match=r"train.freeze: 'down_block' matches no parameter .* down_blocks"):
        run_stage(config(2, 'train.freeze=["mid_block", "down_block"]'), run)  # raises in the driver
    with pytest.raises(TrainStageError, match="freezes every parameter"):
        check_inputs(config(2, 'train.freeze=["*"]'), run)
    counts = check_inputs(config(2, 'train.freeze=["*.attn2.*"]'), run)["parameters"]  # a glob: cross-attention
    assert 0 < counts["frozen"] < counts["trainable"]
    unet = build_unet(load_config("tiny").train.unet, cross_attention_dim=TEXT_SHAPE[1], sample_size=8)
    assert counts["total"] == parameter_count(unet)


def test_the_average_covers_only_trainable_parameters():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    ema = ExponentialMovingAverage(module, decay=0.5)
    assert len(ema.averages) == 2  # the second layer's weight and bias
    frozen, before = module[0].weight.detach().clone(), module[1].weight.detach().clone()
    with torch.no_grad():
        module[1].weight.add_(1.0)
    ema.update()  # decay 0.1 at the first update
    with weights_replaced(module, ema.full_weights()):
        assert torch.equal(module[0].weight, frozen)
        torch.testing.assert_close(module[1].weight, before + 0.9)
    torch.testing.assert_close(module[1].weight, before + 1.0)


def test_a_shifted_toy_set_keeps_only_the_chosen_colours():
    """ingest.toy_colours: the shifted toy set docs/training.md fine-tunes the demo's model on."""
    from pipeline.core.config import ConfigError, IngestConfig
    from pipeline.core.toy import PALETTE, all_specs, generate

    listed = IngestConfig.model_fields["toy_colours"].annotation  # list[Literal[...]] | None
    assert set(get_args(get_args(get_args(listed)[0])[0])) == set(PALETTE)
    specs = all_specs(["red", "blue"])
    assert len(specs) == 6 and {(s.shape_colour, s.background_colour) for s in specs} == {("red", "blue"), ("blue", "red")}
    assert {spec for spec, _ in generate(12, 32, seed=0, colours=["red", "blue"])} == set(specs)
    with pytest.raises(ConfigError, match="ingest.toy_colours"):
        load_config("tiny", overrides=['ingest.toy_colours=["red", "purple"]'])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.mark.e2e
def test_lora_trains_only_adapters_on_the_export_and_resumes_from_checkpoints_without_the_base_on_fewer_workers(
    tmp_path, base_export
):
    from pipeline.core import lora
    from sample.export import load_export

    initial = weights(base_export / layout.EXPORT_UNET)
    # ZeRO-2 (tests/train/test_lora_zero.py covers 0-3 on the engines): its universal form is resharded below.
    overrides = [f'train.init_from="{base_export}"', "train.lora.rank=4", "train.zero_stage=2"]
    run = write_latent_run(tmp_path / "run", seed=1)
    summary = run_stage(config(2, *overrides), run)
    counts = summary["parameters"]
    assert (
        # Rank 4 on the micro UNet's 32- and 64-wide projections: 2.2% of it (1% of the 4.2M tiny UNet).
        counts["frozen"] == sum(value.numel() for value in initial.values()) and 0 < counts["trainable"] < 0.03 * counts["frozen"]
    )
    assert summary["exports"] == [0, 2]
    for step in (0, 2):  # unet/ is the base, bit for bit; the adapter is beside it
        assert all(torch.equal(value, initial[name]) for name, value in exported(run, step).items())
        assert lora.read_record(run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}"))["unet"] == "base"
    probe = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, TEXT_SHAPE[1]))
    started, tuned = (load_export(run, step, str(tmp_path / "s"), torch.device("cpu"))[0] for step in (0, 2))
    base = UNet2DConditionModel.from_pretrained(base_export / layout.EXPORT_UNET)
    assert torch.allclose(started(*probe).sample, base(*probe).sample, atol=1e-6)  # B starts at zero
    assert not torch.allclose(tuned(*probe).sample, base(*probe).sample, atol=1e-4)  # the adapter trained

    full = folder_bytes(base_export.parents[1] / "checkpoints" / layout.step_name(3))  # the base run's, ZeRO-2, same UNet
    adapters_only = folder_bytes(Path(run.path(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(2)}")))
    assert adapters_only < 0.1 * full, (adapters_only, full)

    # From the adapter-only checkpoint, on the base loaded again, and on one worker: through DeepSpeed's universal form.
    one_worker = ["train.num_workers=1", "train.batch_size_per_worker=16"]
    resumed = run_stage(config(3, *overrides, *one_worker), run)
    assert resumed["steps"] == 3 and resumed["resumed_from"] == [2] and resumed["exports"] == [0, 2, 3]
    assert run.read_json(layout.TRAIN_RESUMES)[-1]["workers"] == [2, 1]
    assert all(torch.equal(value, initial[name]) for name, value in exported(run, 3).items())
