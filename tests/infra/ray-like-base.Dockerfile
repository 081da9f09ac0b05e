# Test-only stand-in for rayproject/ray, built by build-image.sh on a local Debian base (Docker
# Hub is out of reach): the same user (ray, uid 1000, group users) owning a Python environment
# on PATH. pip is pointed at the wheels in this build's context, so builds on top of it work
# with --network none.
ARG DEBIAN_IMAGE=t2i-image-test/debian:bookworm
FROM ${DEBIAN_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --create-home --uid 1000 --gid 100 --shell /bin/bash ray
COPY . /wheels
USER 1000:100
RUN python3 -m venv /home/ray/anaconda3
ENV PATH=/home/ray/anaconda3/bin:$PATH \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels
WORKDIR /home/ray
