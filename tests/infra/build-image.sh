#!/usr/bin/env bash
# Builds infra/Dockerfile for real with no network inside the build, then runs `pipeline --help`
# in the image as its non-root user. Docker Hub is out of reach, so the Ray base image is replaced
# by a local stand-in (tests/infra/ray-like-base.Dockerfile) on a Debian rootfs made with
# debootstrap and `docker import`; the project's wheels (torch included, about 600 MB) are
# built on the host first and handed to that base, since `docker build --network none` can't
# download them.
#
#   sudo tests/infra/build-image.sh          (or: make image-test)
#
# Uses a running Docker engine if `docker info` answers; else, as root, installs Debian's
# docker.io and debootstrap if missing and starts a private dockerd (no iptables, no bridge)
# that it stops at the end. Where no engine can be had it prints "skipped: no Docker engine
# (reason)" and exits 0, except under CI (CI=true), where that fails too (exit 1, with the reason);
# every other failure exits non-zero. About 10 minutes the first time
# on 2 cores (apt, debootstrap, wheels); reruns reuse the Debian base and the wheels.
#
# The wheels come from the host's pip settings: here torch is the CPU wheel on local disk; on a
# machine that would pull PyPI's CUDA torch instead, point pip at the CPU build first, e.g.
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. The work folder keeps the Debian base,
# the wheels and the engine's images (about 4 GB) for reruns; delete it to free the space.
#
# Env: IMAGE_TEST_DIR (work folder, default /var/tmp/t2i-image-test), PYTHON (the host Python
# that builds wheels, must be 3.11 like Debian bookworm's, default .venv/bin/python),
# DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${IMAGE_TEST_DIR:-/var/tmp/t2i-image-test}
PYTHON=${PYTHON:-.venv/bin/python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_IMAGE=t2i-image-test/debian:bookworm
BASE_IMAGE=t2i-image-test/ray-base:latest
IMAGE=t2i-image-test/pipeline:latest
mkdir -p "$WORK"

skip() {
    # Under CI (.ci/run exports CI=true) the image test runs or fails: no engine is a failure.
    if [ "${CI:-}" = true ]; then
        echo "FAIL: no Docker engine ($1), and under CI (CI=true) the image test must run" >&2
        exit 1
    fi
    echo "skipped: no Docker engine ($1)"
    exit 0
}

# --- a Docker engine: the one that answers, or a private dockerd we start and stop ---
DOCKERD_PID=""
stop_dockerd() {
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
}
trap stop_dockerd EXIT

if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "none answers and starting one needs root"
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        command -v apt-get >/dev/null || skip "none answers and there is no apt-get to install docker.io"
        (apt-get install -y -q docker.io debootstrap >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null; }) \
            || skip "apt-get could not install docker.io"
    fi
    export DOCKER_HOST="unix://$WORK/docker.sock"
    # No iptables and no bridge: nothing here needs a container network, and a container-in-a-
    # container machine often may not touch either.
    dockerd --iptables=false --ip6tables=false --bridge=none \
        --data-root "$WORK/docker" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" \
        --host "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    docker info >/dev/null 2>&1 || skip "dockerd did not start: $(tail -n 1 "$WORK/dockerd.log")"
fi
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null

start=$(date +%s)

# --- the Debian base: debootstrap once, then `docker import` ---
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log"; exit 1; }
    tar -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi
# An engine that can't run a container is no engine either.
docker run --rm --network none "$DEBIAN_IMAGE" true \
    || skip "the engine cannot run containers here"

# --- the wheels, built on the host (cp311, like bookworm's python3) ---
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11 for bookworm wheels"'
wheels="$WORK/wheels"
if [ ! -f "$wheels/.complete" ] || [ pyproject.toml -nt "$wheels/.complete" ] || [ constraints.txt -nt "$wheels/.complete" ]; then
    rm -rf "$wheels"
    "$PYTHON" -m pip wheel -q -c constraints.txt -w "$wheels" . "setuptools>=68" wheel
    rm -f "$wheels"/t2i_pipeline-*.whl # the image must install from its own copy of the source
    touch "$wheels/.complete"
fi

# --- the stand-in Ray image, then ours on it, both without network ---
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
old_ids="$(image_id "$BASE_IMAGE") $(image_id "$IMAGE")"
docker build -q --network none -f tests/infra/ray-like-base.Dockerfile \
    --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$BASE_IMAGE" "$wheels" >/dev/null
docker build --network none --build-arg BASE_IMAGE="$BASE_IMAGE" -f infra/Dockerfile -t "$IMAGE" .
# Drop what the previous run built, if this one replaced it (a few GB each).
for id in $old_ids; do
    case " $(image_id "$BASE_IMAGE") $(image_id "$IMAGE") " in *" $id "*) ;; *) docker image rm "$id" >/dev/null 2>&1 || true ;; esac
done

# --- the image runs as a non-root user and its CLI answers ---
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
uid=$(docker run --rm --network none "$IMAGE" id -u)
help=$(docker run --rm --network none "$IMAGE")
echo "$help" | head -n 5
[ "$uid" != 0 ] || { echo "FAIL: the image runs as root (USER '$user')"; exit 1; }
echo "$help" | grep -q "run" || { echo "FAIL: pipeline --help printed no 'run' command"; exit 1; }
echo "image-test: ok: $IMAGE built with --network none, runs as uid $uid (USER $user), $(($(date +%s) - start)) s"
