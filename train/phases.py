"""Phases of a multi-resolution schedule: one run trains at one resolution, then goes on at another.

When only encode.resolution changed upstream, the runner keeps `train/` (`pipeline.runner.PHASE_KEYS`)
and the workers resume from the newest committed checkpoint as after any rerun: weights, EMA,
optimizer state and step count carry over (the UNet is convolutional, so its weights fit any
latent size; it is built with the new latents' sample_size, which the exports then record). What
changes is recorded in `TrainState.phases` (resolution and first step of each phase), saved with
every checkpoint: a checkpoint whose last phase has another resolution than the latents starts a
new phase, whose data order starts afresh at the next epoch. The learning rate schedule is the
run's one schedule (`train.engine.restart_schedule`): no second warmup; a cosine then spans the new
train.max_steps from the start of the run.
"""

from __future__ import annotations

from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir

STATE_FILE = "train_state.json"  # as train.checkpoint writes it (kept free of its torch imports)


def latent_resolution(run: RunDir) -> int | None:
    """The resolution of the latents training reads (the encode manifest's; None if it does not say)."""
    return run.read_json(layout.ENCODE_MANIFEST).get("resolution")


def begin_phase(state, resolution: int | None) -> bool:
    """Record the phase `state` (a `TrainState`) trains in; True when a new one starts at its step.

    A new phase's data order starts at the next epoch (or this one, if it has not begun): the new
    latents are other samples to the order, not the rest of the old epoch."""
    if not state.phases:  # a fresh run, or a checkpoint older than phases: it trained at these latents
        state.phases = [{"resolution": resolution, "start_step": 0}]
        return False
    if state.phases[-1]["resolution"] == resolution:
        return False
    state.phases = [*state.phases, {"resolution": resolution, "start_step": state.step}]
    state.epoch, state.taken = state.epoch + (state.taken > 0), 0
    return True


def newest_state(run: RunDir) -> dict[str, Any] | None:
    """train_state.json of the newest committed checkpoint, or None."""
    steps = run.committed_steps(layout.TRAIN_CHECKPOINTS)
    path = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(steps[-1])}/{STATE_FILE}" if steps else None
    return run.read_json(path) if path and run.exists(path) else None


def check_new_phase(run: RunDir, max_steps: int) -> str | None:
    """Why training cannot start a new phase here (max_steps already reached), or None."""
    state, resolution = newest_state(run), latent_resolution(run)
    if not state or not state.get("phases") or state["phases"][-1]["resolution"] == resolution:
        return None
    if state["step"] >= max_steps:
        return (
            f"the latents are now {resolution} px, but the newest checkpoint is at step {state['step']} and "
            f"train.max_steps = {max_steps}: nothing would train at {resolution} px. Raise train.max_steps "
            f"(the steps of both phases together)"
        )
    return None
