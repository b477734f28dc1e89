#!/usr/bin/env python3
"""The container's HEALTHCHECK: healthy when an HTTP endpoint of the process answers 200.

``healthcheck [URL]``: GET the URL (by default lb's Prometheus frontend,
http://127.0.0.1:8405/metrics, as configs/docker/haproxy.cfg binds it; compose passes a
broker's admin API instead). Exit 0 when it answers 200 within the timeout, else 1 with the
reason on stderr, which ``docker inspect`` shows under State.Health. Standard library only.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8405/metrics"
TIMEOUT = 2.0
HTTP_OK = 200


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT_URL
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"unhealthy: GET {url}: {error}", file=sys.stderr)
        return 1
    if status != HTTP_OK:
        print(f"unhealthy: GET {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
