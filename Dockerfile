# syncd container image.
#
#   docker build -t syncd .
#   docker run -d --name syncd --stop-timeout 150 -v syncd-data:/var/lib/syncd \
#     -v "$PWD/syncd.toml:/etc/syncd/syncd.toml:ro" --env-file syncd.env -p 127.0.0.1:9108:9108 syncd
#
# The config holds credentials: mount it read-only and readable by uid 10001 (or put the secrets in --env-file and
# write ${NAME} in the config). Give `docker stop` time for the spool to drain: in-flight pages (60 s) and the
# drain (30 s) are bounded, hence --stop-timeout 150 (Docker's default is 10 s, then SIGKILL; nothing is lost,
# the next start drains what is left).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the wheel, then a virtualenv holding it and its dependencies -------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/syncd \
 && /opt/syncd/bin/pip install /wheels/syncd-*.whl \
 && /opt/syncd/bin/syncd --help >/dev/null

# -- runtime: the virtualenv on a slim base, a user without a login, the data directory as a volume ----------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="syncd" \
      org.opencontainers.image.description="Pull industrial IoT data out of vendor clouds into ClickHouse and MQTT you own" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 syncd \
 && useradd --uid 10001 --gid syncd --home-dir /var/lib/syncd --no-create-home --shell /usr/sbin/nologin syncd \
 && install -d -o syncd -g syncd -m 0750 /var/lib/syncd \
 && install -d -m 0755 /etc/syncd
COPY --from=build /opt/syncd /opt/syncd
# Environment overrides win over the config file: the data directory is the volume, and the HTTP endpoint
# (/metrics /healthz /readyz) listens on every interface of the container so Prometheus can scrape it.
# The health check below reads the same variable, so change the port here (or with -e), not in the file.
ENV PATH=/opt/syncd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SYNCD_SYNCD__DATA_DIR=/var/lib/syncd \
    SYNCD_SYNCD__HTTP=0.0.0.0:9108 \
    SYNCD_SYNCD__LOG_FORMAT=json
VOLUME ["/var/lib/syncd"]
EXPOSE 9108
WORKDIR /var/lib/syncd
USER 10001:10001
# python from the virtualenv, no curl in a slim image; a wildcard address is asked on loopback
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; host, _, port = (os.environ.get('SYNCD_SYNCD__HTTP') or '127.0.0.1:9108').rpartition(':'); host = '127.0.0.1' if host in ('', '0.0.0.0', '::', '[::]') else host; urllib.request.urlopen(f'http://{host}:{port}/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run", "--config", "/etc/syncd/syncd.toml"]
