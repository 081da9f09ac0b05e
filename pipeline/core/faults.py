"""Named points where the fault tests make a process die (or freeze) on purpose.

`PIPELINE_FAULT` holds one JSON fault: {"point": NAME, "action": "kill"|"stop", "once": PATH,
and conditions such as "rank" or "step"}. At `inject(NAME, rank=.., step=..)` a process whose
conditions all match creates PATH (exclusively: exactly one process fires, once) and then
SIGKILLs or SIGSTOPs itself; with "delay_s", it first stays alive that long, so that what other
processes do in the window (Ray Train's controller registering a report) happens before it dies.
The test waits for PATH, so it knows where the run stands without sleeping. Unset, as it always
is outside the tests, `inject` is one environment lookup.

Points: train-step (rank, step: after an optimizer step), checkpoint-files (rank, step: the
rank's checkpoint files are written locally, not yet uploaded), checkpoint-commit (step: every
rank has reported, before rank 0 writes COMMITTED), encode-batch (an encoder actor got a
batch), encode-shard (an encoder actor published a latent shard and its record), ingest-shard
(shard: a download task's img2dataset wrote the shard's tar and stats file, not yet its outcome record).
"""

from __future__ import annotations

import json
import os
import signal
import time

ENV = "PIPELINE_FAULT"


def environment() -> dict[str, str]:
    """The variable for Ray workers' env, when set here."""
    return {ENV: os.environ[ENV]} if ENV in os.environ else {}


def inject(point: str, **where: object) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault = json.loads(spec)
    if fault["point"] != point or any(key in fault and fault[key] != value for key, value in where.items()):
        return
    try:
        os.close(os.open(fault["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # fired already, in this process or another
    time.sleep(fault.get("delay_s", 0))
    os.kill(os.getpid(), signal.SIGSTOP if fault.get("action") == "stop" else signal.SIGKILL)
