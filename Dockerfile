# One image for every service of docker-compose.yml: lb, lb-pki and broker (the project,
# installed with pip), plus the demo package and configs/ in the working directory /app, so
# the services run the same commands, from the same directory, as ./dev demo does locally.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY lb ./lb
COPY broker ./broker
RUN pip install . "paho-mqtt>=2.0"

COPY demo ./demo
COPY configs ./configs

# Nothing runs as root: the certificate volume is owned by this user (see the pki service).
RUN useradd --create-home --uid 10001 fleet \
    && mkdir -p configs/certs demo/out \
    && chown fleet:fleet configs/certs demo/out
USER fleet

EXPOSE 8091
CMD ["lb", "-f", "configs/docker/haproxy.cfg"]
