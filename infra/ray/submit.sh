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
#
# Prints the job id and how to follow it; the job keeps running after this script returns.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift

cd "$(dirname "$0")/../.."  # working_dir and the runtime env's paths are relative to the repo root
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
job_id=${JOB_ID:-t2i-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}

ray job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$job_id" \
    --working-dir . \
    --runtime-env infra/ray/runtime_env.yaml \
    --no-wait \
    -- pipeline run --out "$out" "$@"

cat <<EOF
job id: $job_id
follow: ray job logs --address $RAY_ADDRESS -f $job_id
status: ray job status --address $RAY_ADDRESS $job_id
stop:   ray job stop --address $RAY_ADDRESS $job_id
stages: $out/run.json    report: $out/report/index.html
EOF
