"""Certificate, CA and CRL files re-read while lb runs, without a restart.

Seed 000: EMQX re-reads its certificate files every 120 s, so rotating a certificate or
publishing a new CRL needs no restart. `TLSReloader` does the same for every `bind ... ssl`
line of a process: every `tune.ssl.reload-interval` (default 120 s; 0 turns the timer off)
it compares each bind context's files (crt, its `.key` and `.ocsp`, ca-file,
ca-verify-file, crl-file) by path, mtime and size, and rebuilds the context of any that
changed. New handshakes use the new files; established sessions keep theirs, except that a
bind line with `close-revoked` closes the sessions whose client certificate (or one of its
CAs) the new CRL revokes. A file that fails to load keeps the old material in force and
the log says why. The runtime API's `reload ssl` runs the same check at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

from OpenSSL import SSL

from lb import tls_io
from lb.pem import TLSFileError, common_name, file_signature
from lb.tls import BindContext, describe_name, utc_text

if TYPE_CHECKING:
    from lb.frontend import FrontendRuntime
    from lb.process import Runtime

logger = logging.getLogger(__name__)


class TLSReloader:
    """Watches the TLS files of one process's bind lines; see the module docstring."""

    def __init__(self, runtime: Runtime, interval: float) -> None:
        self.runtime = runtime
        self.interval = interval
        self.timer: asyncio.TimerHandle | None = None
        self.signatures: dict[int, tuple[tuple[str, int, int], ...]] = {}
        self.reloads = 0
        self.failures = 0
        for context in runtime.bind_contexts():
            self.signatures[id(context)] = file_signature(context.watched_files())

    def start(self) -> None:
        if self.interval > 0 and self.signatures:
            self.timer = self.runtime.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _tick(self) -> None:
        self.timer = None
        try:
            self.check()
        finally:
            if self.interval > 0:
                self.timer = self.runtime.loop.call_later(self.interval, self._tick)

    def check(self, *, force: bool = False) -> str:
        """Reload what changed (everything with `force`); returns a report, one line each."""
        report: list[str] = []
        for frontend in self.runtime.frontends:
            for index, context in frontend.contexts.items():
                if context is None:
                    continue
                line = self._check_context(frontend, index, context, force)
                if line:
                    report.append(line)
        return "\n".join(report) + "\n" if report else "no change\n"

    def _check_context(
        self, frontend: FrontendRuntime, index: int, context: BindContext, force: bool
    ) -> str | None:
        signature = file_signature(context.watched_files())
        key = id(context)
        if not force and self.signatures.get(key) == signature:
            return None
        self.signatures[key] = signature
        bind = frontend.binds[index]
        where = f"frontend {frontend.name} bind {bind.address}"
        try:
            context.reload_files()
        except (TLSFileError, SSL.Error, ValueError) as error:
            self.failures += 1
            logger.error(
                "%s: TLS files not reloaded, the previous ones stay in force: %s", where, error
            )
            return f"{where}: not reloaded: {error}"
        self.reloads += 1
        logger.warning(
            "%s: certificate, CA and CRL files reloaded (%d CRL(s), %d OCSP response(s))",
            where,
            len(context.crls),
            len(context.ocsp_responses),
        )
        now = dt.datetime.now(dt.UTC)
        for crl in context.crls:
            # What `lb -c` warns about, said at the moment it starts to matter: OpenSSL now
            # refuses every chain this CRL covers (X509_V_ERR_CRL_HAS_EXPIRED).
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                logger.warning(
                    "%s: crl-file %s: the CRL of '%s' expired on %s (nextUpdate): every "
                    "client whose chain it covers is refused until a fresh CRL is published",
                    where,
                    bind.crl_file,
                    describe_name(crl.issuer),
                    utc_text(crl.next_update_utc),
                )
        closed = 0
        if bind.close_revoked and context.crls:
            closed = self._close_revoked(frontend, index, context)
        suffix = f", {closed} revoked session(s) closed" if closed else ""
        return f"{where}: reloaded{suffix}"

    def _close_revoked(self, frontend: FrontendRuntime, index: int, context: BindContext) -> int:
        closed = 0
        for client in list(frontend.sessions):
            if client.bind_index != index or client.tls is None or client.closed:
                continue
            # The leaf from the session (a resumed session has no verified chain), then the
            # chain verification built, then whatever the client sent.
            revoked = context.revoked(tls_io.peer_certificates(client.tls))
            if revoked is None:
                continue
            closed += 1
            frontend.counters.revoked_closed += 1
            logger.warning(
                "%s:%d frontend %s: closing session: certificate '%s' (serial %x) is revoked "
                "by the reloaded CRL (close-revoked)",
                client.peer[0],
                client.peer[1],
                frontend.name,
                common_name(revoked.subject) or revoked.subject.rfc4514_string(),
                revoked.serial_number,
            )
            client.kill("K")
        return closed
