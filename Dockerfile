# The mesh runtime and the bundled agents in one image; the entrypoint is the `mesh` command:
#
#   docker build -t mesh-runtime .
#   docker run --rm -e MESH_NATS_URL=nats://nats.example:4222 mesh-runtime run mesh.agents.support.triage:agent
#
# docker-compose.yml runs the support-desk demo agents from it; tests/test_compose.py checks both files.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user (numeric id, so `runAsNonRoot` can verify it) owning the data dir.
RUN groupadd --system --gid 10001 mesh \
    && useradd --system --uid 10001 --gid mesh --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin mesh \
    && install -d -o mesh -g mesh -m 0750 /data \
    && install -d -o mesh -g mesh -m 0700 /auth

# Only what the package build needs (README.md is the package's long description).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mesh/ mesh/
COPY schemas/ schemas/
COPY agents/ agents/
RUN pip install . && rm -rf build ./*.egg-info

# Where the embedded server, span file and logs go (`mesh up`, MESH_TRACE_EXPORTER=file).
ENV MESH_DATA_DIR=/data
USER 10001:10001
WORKDIR /data

ENTRYPOINT ["mesh"]
CMD ["--help"]
