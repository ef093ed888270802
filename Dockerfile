# syntax=docker/dockerfile:1
# The Agent OS image: every service (`agent-os serve ...`), the CLI and the demo programs
# (`python -m agent_os.demo.fleet`, `python -m agent_os.demo.auditor`), installed at the
# versions of requirements.lock. The compose demos in deploy/demos/ build it; on its own:
#
#   docker build -t agent-os .
#   docker run --rm agent-os agent-os --version
#
# Stage 1 builds the project's wheel and a wheel of every locked dependency (compilers would be
# here if a dependency had no wheel); stage 2 installs only those wheels, with no index and no
# build tools, on a slim Python, and runs as an unprivileged user. EXTRAS picks the parts (the
# `local-embeddings` extra adds CPU torch, about 1 GB: the demos use the hashing embedder).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=nats,redis,kafka,postgres,cmvk,iatp,service,observability,console,sandbox
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m pip install -c requirements.lock pip setuptools wheel
COPY pyproject.toml README.md ./
# agent_os/ links to the folders below (agent_os/amb -> ../modules/amb, ...): copy them all.
COPY agent_os ./agent_os
COPY modules ./modules
COPY bus_adapters ./bus_adapters
COPY control_plane ./control_plane
COPY services ./services
RUN python -m pip wheel --no-deps --no-build-isolation -w /dist . \
    && python -m pip wheel -c requirements.lock -w /wheels \
        "agent-os[${EXTRAS}] @ file://$(ls /dist/agent_os-*.whl)"

FROM ${PYTHON_IMAGE}
ARG EXTRAS=nats,redis,kafka,postgres,cmvk,iatp,service,observability,console,sandbox
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# An unprivileged user owning the two places a deployment writes: /keys (IATP key stores,
# 0700 as the key store requires) and /data (flight recorders). Named volumes mounted there
# start with this ownership.
RUN groupadd --system --gid 10001 agentos \
    && useradd --system --uid 10001 --gid agentos --create-home --home-dir /home/agentos agentos \
    && install -d -o agentos -g agentos -m 0700 /keys \
    && install -d -o agentos -g agentos -m 0750 /data
COPY --from=build /src/requirements.lock /tmp/requirements.lock
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m pip install --no-index --find-links /wheels -c /tmp/requirements.lock \
        "agent-os[${EXTRAS}] @ file://$(ls /dist/agent_os-*.whl)" \
    && rm /tmp/requirements.lock \
    && agent-os --version
USER agentos
WORKDIR /home/agentos
CMD ["agent-os", "--help"]
