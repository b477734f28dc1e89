# One image for every service of docker-compose.yml: lb, lb-pki and broker (the project,
# installed in a virtualenv), plus the demo package and configs/ in the working directory
# /app, so the services run the same commands, from the same directory, as ./dev demo does.
#
# The build needs no network: every Python package comes from build/wheels, made on the host
# from requirements/image.lock (hashes checked) by `python3 packaging/image.py wheels`.
# `./dev compose ...` does that, and where no registry serves python:3.11-slim it makes an
# equivalent base image from Debian's packages (packaging/image.py base) and passes it as
# BASE_IMAGE. By hand:
#   python3 packaging/image.py wheels
#   docker build --build-arg BASE_IMAGE=$(python3 packaging/image.py base) -t iot-edge-lb .
ARG BASE_IMAGE=python:3.11-slim

# -- build: the virtualenv, from wheels only -----------------------------------------------------
FROM ${BASE_IMAGE} AS build
# The labels let the tests remove what earlier builds left untagged, and only that.
LABEL iot-edge-lb.stage=build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv

# The pinned dependencies first, so that a code change does not reinstall them.
COPY requirements/image.lock /src/requirements/image.lock
COPY build/wheels /src/wheels
RUN /opt/venv/bin/pip install --no-index --find-links /src/wheels \
        --require-hashes -r /src/requirements/image.lock

COPY pyproject.toml README.md /src/
COPY lb /src/lb
COPY broker /src/broker
# The project itself, built by the setuptools the lock pinned; then the installers go, the
# final image runs programs and installs nothing.
RUN /opt/venv/bin/pip install --no-index --no-deps --no-build-isolation /src \
    && /opt/venv/bin/pip uninstall --yes setuptools pip \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# -- the image: the virtualenv, the demo and configs; no compiler, no pip, not root --------------
FROM ${BASE_IMAGE}
LABEL iot-edge-lb.stage=image

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY demo ./demo
COPY configs ./configs
COPY packaging/healthcheck.py /usr/local/bin/healthcheck

# Nothing runs as root: the certificate volume is owned by this user (see the pki service).
RUN useradd --create-home --uid 10001 fleet \
    && mkdir -p configs/certs demo/out \
    && chown fleet:fleet configs/certs demo/out \
    && chmod 0755 /usr/local/bin/healthcheck
USER fleet

EXPOSE 8091
# HAProxy's image does the same: `docker stop` asks for a soft stop (SIGUSR1: stop accepting,
# let sessions finish, bounded by hard-stop-after in the config, which is below compose's
# stop_grace_period). SIGTERM still stops at once; SIGUSR2 or SIGHUP reload the config.
STOPSIGNAL SIGUSR1
# lb is healthy when its Prometheus frontend answers (127.0.0.1:8405 in configs/docker/
# haproxy.cfg); compose points the brokers' check at their admin API instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["healthcheck"]
CMD ["lb", "-f", "configs/docker/haproxy.cfg"]
