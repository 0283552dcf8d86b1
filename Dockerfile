# syntax=docker/dockerfile:1
# One image for everything Hotswap runs: `hotswap worker`, `hotswap zoo build`, the operator's
# `hotswap update|rollback|status`. ENTRYPOINT is `hotswap`; a service's command is its subcommand.
# tests/ops/test_stack.py parses this file and holds it to the CLI, the settings and the compose file.
#
# torch comes from the package registry, with its CUDA libraries on Linux: the same image serves
# HOTSWAP_DEVICE=cpu and, on a host with the NVIDIA container toolkit, HOTSWAP_DEVICE=cuda.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/hotswap
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY worker worker
COPY control control
COPY loadtest loadtest
COPY console console
# As the Makefile does: the modelscope extra, and MTCNN's published weights without the wheel's
# stale pins (torch<2.3, numpy<2), which pip would honour by downgrading torch.
RUN /opt/hotswap/bin/pip install '.[modelscope]' \
 && /opt/hotswap/bin/pip install --no-deps facenet-pytorch==2.6.0

FROM ${PYTHON_IMAGE}
# libGL and glib: ultralytics pulls in opencv-python, whose cv2 links them even headless.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
# A numeric user, so that Kubernetes' runAsNonRoot can verify it; /models, the key directories and
# the load slots' directory belong to it, so named volumes mounted there start out writable by it.
RUN groupadd --gid 10001 hotswap \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hotswap \
 && mkdir -p /models /keys /operator-keys /run/hotswap-load \
 && chown hotswap:hotswap /models /keys /operator-keys /run/hotswap-load
COPY --from=build /opt/hotswap /opt/hotswap
ENV PATH=/opt/hotswap/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOTSWAP_MODEL_ROOT=/models \
    HOTSWAP_STATUS_HOST=0.0.0.0 \
    HOTSWAP_STATUS_PORT=8080
USER 10001:10001
WORKDIR /home/hotswap
EXPOSE 8080
# /healthz answers as soon as the process runs (before its models load); readiness is /readyz's.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HOTSWAP_STATUS_PORT', '8080') + '/healthz', timeout=3)"]
ENTRYPOINT ["hotswap"]
CMD ["worker", "--model", "shapes"]
