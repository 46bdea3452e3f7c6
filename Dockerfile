# Aforo Edge: one image for both roles, chosen by the first argument.
#   docker build -t aforo-edge .
#   docker run aforo-edge proxy --config /etc/aforo/proxy.yaml
#   docker run -e AFORO_DATABASE_URL=postgresql://… -e AFORO_REDIS_URL=redis://… aforo-edge control-plane
# The builder stage compiles the decision core and the proxy's hot path with Cython
# (it alone has a C compiler) into a virtualenv; the runtime stage is the slim base
# plus that virtualenv, run as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/aforo
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY decision_core decision_core
COPY config config
COPY control_plane control_plane
COPY proxy proxy
COPY all_in_one all_in_one
COPY bench bench
# A wheel (not an editable install): the compiled modules and the example settings
# land in the virtualenv's site-packages, and /src is left behind with the compiler.
RUN /opt/aforo/bin/pip install . \
    && cd / \
    && AFORO_EXPECT_COMPILED=1 /opt/aforo/bin/python -c \
       "import decision_core, proxy.connection; assert decision_core.COMPILED, 'decision core not compiled'; \
assert proxy.connection.__file__.endswith('.so'), 'proxy hot path not compiled'"

FROM ${PYTHON_IMAGE}
# A fixed uid, so volumes (the SQLite store, the meter spool) can be owned by it.
RUN groupadd --system --gid 10001 aforo \
    && useradd --system --uid 10001 --gid aforo --home-dir /var/lib/aforo --create-home aforo \
    && mkdir -p /etc/aforo
COPY --from=builder /opt/aforo /opt/aforo
ENV PATH=/opt/aforo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Relative paths in the settings are read from the settings file's directory; write
# state (SQLite file, meter spool) under /var/lib/aforo, the user's own directory.
WORKDIR /var/lib/aforo
USER 10001:10001
# proxy: 8080 (clients) and 9090 (health, metrics); control plane: 8070 (REST API).
EXPOSE 8080 9090 8070
ENTRYPOINT ["aforo"]
CMD ["--help"]
