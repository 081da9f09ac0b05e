#!/usr/bin/env bash
# Submit `pipeline run` to a running Ray cluster as a Ray job, from the repository root.
#
#   infra/ray/submit.sh OUT [pipeline run options...]
#
#   OUT       the run directory, seen from the cluster: s3://bucket/runs/NAME (or another fsspec
#             URL), or an absolute path on storage every node shares. A relative path would land
#             in the job's temporary working directory and vanish with it.
#   options   passed to `pipeline run`, e.g. --preset tiny, --config configs/x.toml (a path
#             inside this checkout: it travels with the working directory), --set key=value.
#
# Environment:
#   RAY_ADDRESS          the cluster's dashboard / job API (default http://127.0.0.1:8265)
#   RAY_AUTH_TOKEN       the cluster's token (`ray get-auth-token` on the head), or
#   RAY_AUTH_TOKEN_PATH  a file holding it (Ray's default: ~/.ray/auth_token)
#   RAY_AUTH_MODE        default token: the client sends the token only in token mode
#   JOB_ID               submission id (default t2i-DATE-TIME-RANDOM)
#   PYTHON               a Python with Ray installed, that submits the job (default python3)
#
# Prints the job id and how to follow it; the job keeps running after this script returns.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift

cd "$(dirname "$0")/../.."  # working_dir and the runtime env's paths are relative to the repo root
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
job_id=${JOB_ID:-t2i-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}

# The entrypoint is a shell command line on the head: every argument is quoted with shlex.join, so
# `--out 's3://b/x;id'` stays one argument and runs nothing. Submitted with Ray's SDK, not the `ray
# job submit` CLI, whose own joining of arguments differs between Ray releases (older ones don't
# quote `;`, `$`, `|`).
"${PYTHON:-python3}" - "$job_id" "$out" "$@" <<'PY'
import os
import shlex
import sys

import yaml
from ray.job_submission import JobSubmissionClient

job_id, out, *options = sys.argv[1:]
with open("infra/ray/runtime_env.yaml") as file:
    runtime_env = yaml.safe_load(file)
runtime_env["working_dir"] = "."
client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
client.submit_job(
    entrypoint=shlex.join(["pipeline", "run", "--out", out, *options]),
    submission_id=job_id,
    runtime_env=runtime_env,
)
PY

cat <<EOF
job id: $job_id
follow: ray job logs --address $RAY_ADDRESS -f $job_id
status: ray job status --address $RAY_ADDRESS $job_id
stop:   ray job stop --address $RAY_ADDRESS $job_id
stages: $out/run.json    report: $out/report/index.html
EOF
