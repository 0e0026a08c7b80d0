# The CPU image: the service, onnxruntime and the embedded default model; no torch.
# BASE_IMAGE may be any Debian-like image with python3 (>= 3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY model_export ./model_export
COPY service ./service
COPY bench ./bench
# The versions CI tested (constraints.txt), not whatever is newest on the day of the build.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -c constraints.txt ".[cpu]"

FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
# Nothing writes to the root filesystem: it can be mounted read-only (give /tmp a tmpfs).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIT_DRAIN_GRACE_S=25
# A numeric, unprivileged user: it needs no /etc/passwd entry, so minimal bases work too.
USER 10001:10001
EXPOSE 8000
# Readiness, not liveness: a draining or warming container is not "healthy" for traffic.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# SIGTERM starts the drain (readiness 503, in-flight requests finish within VIT_DRAIN_GRACE_S);
# give `docker stop -t` / stop_grace_period more than that grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vit-serve", "--host", "0.0.0.0", "--port", "8000"]
