"""``broker`` on a slow disk, for tests: ``python slow_disk_broker.py SECONDS -c FILE``
runs the broker with each store commit's callbacks (the PUBACKs, SUBACKs and link ACKs
that wait for it) run SECONDS late, as if every commit took that long; batches pile up
behind it as behind a slow disk. A commit's length is the window in which, say, a peer's
link drops between a message's routing and its acknowledgement (broker.replica.Forwarded:
the PUBACK that waited forever for a node that was gone, 1 run in 12 on a loaded machine
until 707c4a2, every run on this disk). cluster_harness.running_cluster(commit_delay=...).
"""

from __future__ import annotations

import sys
from typing import Any

from broker import store
from broker.cli import main


def slow_commits(delay: float) -> None:
    committed = store.DiskStore._committed

    def late(self: store.DiskStore, *arguments: Any) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_later(delay, committed, self, *arguments)

    setattr(store.DiskStore, "_committed", late)  # noqa: B010 (a method replaced)


if __name__ == "__main__":
    slow_commits(float(sys.argv.pop(1)))
    sys.exit(main())
