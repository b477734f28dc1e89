"""Wiring of one broker node: config -> Broker core, listeners, admin endpoint, ticker.

:class:`BrokerServer` is what ``broker -c FILE`` runs. It builds the
:class:`~broker.core.Broker` with the event loop's clock, starts one
:class:`~broker.listener.Listener` per configured listener (TLS ones get their context from
:mod:`broker.tls_listener`), the admin endpoint, and a one-second ticker
for delayed wills and session expiry. The cluster and authorization implementations are
passed in (see :mod:`broker.hooks`); both default to a standalone, allow-all node.

An ``[authorization]`` section (seed 003) makes the authorization a
:class:`~broker.authz.PolicyAuthorization` over the policy file, polled every
``reload_interval`` and reloadable with ``POST /api/authz/reload`` on the admin endpoint; an
update disconnects the clients of the linked listeners (5.0: DISCONNECT 0x98). Listeners
with ``password_file`` check passwords (:mod:`broker.authentication`). Every node serves the
state store (:mod:`broker.statestore`) on its request topic.

``[store]`` (issue 12, :mod:`broker.store`): the store is opened and read back before
anything listens; the core and the cluster rebuild sessions, queues, retained messages and
outboxes from it. Then the cluster starts, and the listeners open once the node has joined it
(every running peer linked and synced, at most ``[cluster] join_timeout``), then the admin
endpoint. ``stop`` evacuates the node first when ``[cluster] stop_evacuation`` says so
(broker.evacuation: clients moved off, then sessions migrated, at a bounded rate and for a
bounded time), closes the listeners (5.0 clients get DISCONNECT 0x8B), lets the
cluster have what they sent acknowledged (at most ``STOP_DRAIN_TIMEOUT``), closes the
links, and writes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.admin import AdminServer
from broker.authentication import PasswordFile, PasswordFileError
from broker.authz import PolicyAuthorization, PolicyError, ReloadResult, X509Attributes
from broker.cluster import Cluster
from broker.config import BrokerConfig, ConfigError, ListenerConfig, SSLOptions, config_warnings
from broker.core import Broker
from broker.evacuation import SESSION_RATE, WAIT_TAKEOVER, Evacuation
from broker.evacuation import TICK as EVACUATION_TICK
from broker.hooks import AuthorizationHook, ClusterHook
from broker.listener import Listener
from broker.mqtt import ReasonCode
from broker.partition import MinorityPause
from broker.statestore import StateStore
from broker.store import StoreError, open_store
from broker.tls_listener import ReloadingContext, build_server_ssl_context
from lb.heap import libc_malloc_trim
from lb.proxy_hmac import HeaderAuthenticator, KeyFile, KeyFileError

__all__ = ["BrokerServer", "default_ssl_context"]

logger = logging.getLogger(__name__)

TICK_INTERVAL = 1.0
#: At a stop, after the clients are gone: how long the cluster may take to have what this node
#: sent acknowledged (its peers' and its backup's), before the links close.
STOP_DRAIN_TIMEOUT = 5.0
#: Clients per second an evacuation disconnects unless told (EMQX's conn-evict-rate: 500).
DEFAULT_EVACUATION_RATE = 500.0


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) (lb.heap finds it): gives freed heap pages back to the system
    (issue 14 item 1: memory back near the baseline once queued messages are gone); None
    without glibc."""
    trim = libc_malloc_trim()
    if trim is None:
        return None
    return lambda: trim(0)


def default_ssl_context(options: SSLOptions) -> ssl.SSLContext:
    """A server context for a ``[listeners.ssl.NAME]`` listener (broker.tls_listener)."""
    return build_server_ssl_context(options)


class BrokerServer:
    def __init__(
        self,
        config: BrokerConfig,
        cluster: ClusterHook | None = None,
        authorization: AuthorizationHook | None = None,
        ssl_context_factory: Callable[[SSLOptions], ssl.SSLContext] = default_ssl_context,
        cluster_status: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        loop = asyncio.get_running_loop()
        # A [cluster] section makes this node a cluster member (seed 002, broker/cluster.py).
        self.cluster: Cluster | None = None
        if cluster is None and config.cluster is not None:
            self.cluster = cluster = Cluster(config)
            if cluster_status is None:
                cluster_status = self.cluster.status
        # [authorization] (seed 003): policy hook, password files, reload poller.
        self.authorization: PolicyAuthorization | None = None
        self._policy_poller: asyncio.TimerHandle | None = None
        self.authorization_disconnected = 0
        if authorization is None and config.authorization is not None:
            self.authorization = authorization = self._build_authorization(config)
        try:
            self.store = open_store(config.store)
        except StoreError as error:
            raise ConfigError(config.origin, "store.path", str(error)) from None
        if self.cluster is not None:
            # Issue 13: persistent sessions' writes also go to the backup node.
            self.store = self.cluster.replicated(self.store)
        self.broker = Broker(
            config.mqtt,
            config.node_name,
            clock=loop.time,
            wall_clock=time.time,
            cluster=cluster,
            authorization=authorization,
            store=self.store,
        )
        self.broker.release_memory = malloc_trim()
        for listener_config in config.listeners:
            if listener_config.password_file is not None:
                try:
                    passwords = PasswordFile(listener_config.password_file)
                except PasswordFileError as error:
                    raise ConfigError(
                        config.origin,
                        f"listeners.{listener_config.kind}.{listener_config.name}.password_file",
                        str(error),
                    ) from None
                self.broker.password_checks[listener_config.label] = passwords.check
        # proxy_protocol_hmac_keys: one authenticator (and replay cache) per key file, shared
        # by the listeners that name it, so a header replayed to another listener is seen.
        self.header_authenticators: dict[str, HeaderAuthenticator] = {}
        by_path: dict[Path, HeaderAuthenticator] = {}
        for listener_config in config.listeners:
            path = listener_config.proxy_protocol_hmac_keys
            if path is None:
                continue
            if path not in by_path:
                try:
                    key_file = KeyFile(path, loop.time)
                except KeyFileError as error:
                    raise ConfigError(
                        config.origin,
                        f"listeners.{listener_config.kind}.{listener_config.name}"
                        ".proxy_protocol_hmac_keys",
                        str(error),
                    ) from None
                by_path[path] = HeaderAuthenticator(
                    key_file,
                    listener_config.proxy_protocol_hmac_window,
                    listener_config.proxy_protocol_hmac_replay_cache,
                )
            self.header_authenticators[listener_config.label] = by_path[path]
        for warning in config_warnings(config):
            logger.warning("%s", warning)
        self.state_store = StateStore(self.broker, cluster=self.cluster)
        self.state_store.install()
        if self.cluster is not None:
            self.cluster.attach(self.broker)
        stored = self.store.load()
        self.broker.restore(stored)
        if self.cluster is not None:
            self.cluster.restore(stored)
        self.state_store.restore(stored)
        self.store.start(loop)
        self.ssl_context_factory = ssl_context_factory
        self.listeners: list[Listener] = []
        self.evacuation: Evacuation | None = None
        # [cluster] partition_handling = "pause_minority" (broker.partition).
        self.pause: MinorityPause | None = None
        if self.cluster is not None and self.cluster.cluster_config.partition_handling == (
            "pause_minority"
        ):
            self.pause = self.cluster.pause = MinorityPause(
                self.broker, self.listeners, loop, self._evacuating
            )
        self.admin: AdminServer | None = None
        if config.admin is not None:
            self.admin = AdminServer(
                self.broker,
                config.admin.host,
                config.admin.port,
                cluster_status,
                config=config.admin,
                origin=config.origin,
            )
            self.admin.listener_status = self.listener_status
            if self.authorization is not None:
                self.admin.authorization_reload = self.reload_authorization
            if self.cluster is not None:
                self.admin.cluster_commands = {
                    "disconnect": self.cluster.suspend,
                    "connect": self.cluster.resume,
                    "forget": self.cluster.forget,
                }
        self._ticker: asyncio.TimerHandle | None = None
        self._hurry = asyncio.Event()
        if self.admin is not None:
            self.admin.evacuation = self.evacuation_command

    # --- evacuation (broker.evacuation) ------------------------------------------------------

    def _evacuating(self) -> bool:
        """An evacuation keeps the listeners closed (a pause that ends leaves them so)."""
        return self.evacuation is not None and self.evacuation.state != "ended"

    def evacuation_command(self, method: str, values: dict[str, Any]) -> dict[str, Any]:
        """The admin API's /api/evacuation: POST starts one (or sets the rates, wait and
        targets of the one under way), DELETE ends it (the listeners open again), GET tells.
        ``values``: the POST's parameters given (broker.admin). ValueError for a migrate_to
        naming no peer of this node."""
        evacuation = self.evacuation
        migrate_to: list[str] | None = values.get("migrate_to")
        if migrate_to is not None:
            peers = set() if self.cluster is None else set(self.cluster.peers)
            unknown = sorted(set(migrate_to) - peers)
            if unknown or not migrate_to:
                raise ValueError(
                    f"migrate_to: {', '.join(unknown) or 'empty'}: not a peer of this node "
                    f"({', '.join(sorted(peers)) or 'none'})"
                )
        if method == "POST":
            rate = values.get("rate", DEFAULT_EVACUATION_RATE)
            if evacuation is not None and evacuation.state != "ended":
                evacuation.set_rate(
                    rate, values.get("wait_takeover"), values.get("session_rate"), migrate_to
                )
            else:
                evacuation = self.evacuation = Evacuation(
                    self.broker,
                    self.listeners,
                    rate,
                    asyncio.get_running_loop(),
                    values.get("wait_takeover", WAIT_TAKEOVER),
                    mover=self.cluster,
                    session_rate=values.get("session_rate", SESSION_RATE),
                    migrate_to=migrate_to or (),
                )
        elif method == "DELETE" and evacuation is not None and evacuation.state != "ended":
            # Paused in a minority (broker.partition): the listeners open when it ends.
            evacuation.end(listen=self.pause is None or not self.pause.paused)
        if evacuation is None:
            return {"node": self.config.node_name, "state": "none"}
        return evacuation.status()

    # --- authorization (seed 003) -----------------------------------------------------------

    def _build_authorization(self, config: BrokerConfig) -> PolicyAuthorization:
        settings = config.authorization
        assert settings is not None
        linked = {
            listener.label: listener.authentication
            for listener in config.listeners
            if listener.authorization
        }
        if not linked:
            logger.warning(
                "[authorization] is configured but no listener sets authorization = true: "
                "it applies to no client"
            )
        try:
            return PolicyAuthorization(
                settings.policy_file,
                linked,
                [X509Attributes(*entry) for entry in settings.x509_attributes],
                on_update=self._authorization_updated,
            )
        except PolicyError as error:
            raise ConfigError(config.origin, "authorization.policy_file", str(error)) from None

    def _authorization_updated(self, policy: object) -> None:
        """Seed 003: clients connected during a policy update are disconnected."""
        linked = {listener.label for listener in self.config.listeners if listener.authorization}
        self.authorization_disconnected = self.broker.disconnect_clients(
            lambda connection: connection.identity.listener in linked,
            ReasonCode.ADMINISTRATIVE_ACTION,
            "authorization policy updated",
        )
        logger.info(
            "authorization policy updated: %d clients disconnected",
            self.authorization_disconnected,
        )

    def reload_authorization(self) -> dict[str, Any]:
        """Reload the policy file now (the admin endpoint's POST /api/authz/reload)."""
        assert self.authorization is not None
        self.authorization_disconnected = 0
        result: ReloadResult = self.authorization.reload()
        return {
            "policy_file": str(self.authorization.policy_file),
            "changed": result.changed,
            "error": result.error,
            "rules": result.rules,
            "disconnected": self.authorization_disconnected,
        }

    def _poll_policy(self) -> None:
        authorization = self.authorization
        assert authorization is not None and self.config.authorization is not None
        try:
            if authorization.file_changed():
                self.reload_authorization()
        except Exception:
            logger.exception("authorization policy reload failed")
        self._policy_poller = asyncio.get_running_loop().call_later(
            self.config.authorization.reload_interval, self._poll_policy
        )

    def _tls_for(self, listener: ListenerConfig) -> ReloadingContext | None:
        """TLS listeners reload their certificates and CRL from disk (seed 000)."""
        if listener.kind != "ssl" or listener.ssl_options is None:
            return None
        return ReloadingContext(
            f"listener {listener.label}", listener.ssl_options, self.ssl_context_factory
        )

    async def start(self) -> None:
        try:
            if self.cluster is not None:
                await self.cluster.start()
                await self._join()
                self.cluster.backup_settled()  # if the join ended first (join_timeout)
            self.broker.settle_wills_at_crash(
                None if self.cluster is None else self.cluster.crash_wills_holder()
            )
            for listener_config in self.config.listeners:
                listener = Listener(
                    listener_config,
                    self.broker,
                    tls=self._tls_for(listener_config),
                    authenticator=self.header_authenticators.get(listener_config.label),
                )
                await listener.start()
                self.listeners.append(listener)
            if self.pause is not None:
                self.pause.listening_started()
            if self.admin is not None:
                await self.admin.start()
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.get_running_loop().call_later(TICK_INTERVAL, self._tick)
        if self.authorization is not None and self.config.authorization is not None:
            self._policy_poller = asyncio.get_running_loop().call_later(
                self.config.authorization.reload_interval, self._poll_policy
            )
        logger.info("node %s started", self.config.node_name)

    def _tick(self) -> None:
        try:
            self.broker.tick()
        except Exception:
            logger.exception("broker tick failed")
        self._ticker = asyncio.get_running_loop().call_later(TICK_INTERVAL, self._tick)

    def listener_status(self) -> list[dict[str, Any]]:
        """Each listener's figures (the admin API's /api/listeners and /metrics)."""
        return [listener.status() for listener in self.listeners]

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.config.name == name:
                return listener
        raise KeyError(name)

    async def _join(self) -> None:
        """Clients wait (the listeners are not open yet) until the running peers are linked
        and have sent their routes, members and owned sessions, at most join_timeout: a node
        that served first made fresh sessions for devices whose sessions live on, and dropped
        their messages for want of the cluster's routes."""
        cluster = self.cluster
        assert cluster is not None
        timeout = cluster.cluster_config.join_timeout
        if not cluster.peers or timeout <= 0:
            return
        if cluster.restarted_on_store:
            logger.info(
                "cluster: restarted on the store: waiting up to %gs for every peer, also where "
                "nobody listens yet (they may be starting too), before serving clients",
                timeout,
            )
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await cluster.join()
        except TimeoutError:
            logger.warning(
                "cluster: serving clients after join_timeout %gs without %s (no link yet)",
                timeout,
                ", ".join(cluster.unjoined()),
            )
            return
        linked = sum(1 for peer in cluster.peers.values() if peer.synced)
        logger.info(
            "cluster: joined in %.1fs: %d of %d peers linked and synced%s, serving clients",
            time.monotonic() - started,
            linked,
            len(cluster.peers),
            "" if linked == len(cluster.peers) else " (no link to the others: not running)",
        )

    def hurry(self) -> None:
        """A second stop signal: an evacuation under way at the stop is cut short."""
        self._hurry.set()

    async def _evacuate_before_stop(self) -> None:
        """``[cluster] stop_evacuation``: a stop first evacuates the node (as ``POST
        /api/evacuation``, or goes on with the one under way), for at most that long (or
        until :meth:`hurry`): clients moved off and then sessions migrated, both at
        ``stop_evacuation_rate`` per second, a third of the time at most waiting for the
        devices to take their sessions themselves. Not when no other node is up to take
        them."""
        cluster, settings = self.cluster, self.config.cluster
        if cluster is None or settings is None or settings.stop_evacuation <= 0:
            return
        bound = settings.stop_evacuation
        if not cluster.migration_targets():
            logger.warning("stop: no other node of the cluster is up: no evacuation")
            return
        loop = asyncio.get_running_loop()
        evacuation = self.evacuation
        if evacuation is None or evacuation.state == "ended":
            rate = float(settings.stop_evacuation_rate)
            evacuation = self.evacuation = Evacuation(
                self.broker,
                self.listeners,
                rate,
                loop,
                bound / 3,
                mover=cluster,
                session_rate=rate,
            )
        deadline = loop.time() + bound
        while evacuation.state != "done" and not self._hurry.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), min(left, EVACUATION_TICK))
        status = evacuation.status()
        if evacuation.state == "done":
            logger.info(
                "stop: node %s evacuated in %.1fs (%d clients moved off, %d sessions migrated)",
                self.config.node_name,
                status["seconds"],
                status["evicted"],
                status["sessions_migrated"],
            )
        else:
            logger.warning(
                "stop: the evacuation of node %s is not done (%s after %.1fs; %s): %d clients "
                "and %d sessions left go with the stop",
                self.config.node_name,
                status["state"],
                status["seconds"],
                "cut short by a second signal"
                if self._hurry.is_set()
                else f"stop_evacuation {bound:g}s",
                status["clients_left"],
                status["sessions_left"],
            )

    async def stop(self) -> None:
        if self.pause is not None:
            self.pause.cancel()
        await self._evacuate_before_stop()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.evacuation is not None:
            self.evacuation.end(listen=False)
        if self._policy_poller is not None:
            self._policy_poller.cancel()
            self._policy_poller = None
        # The clients go first, while the links are up: what they published, their wills
        # and their ended sessions reach the peers and the backup before the links close
        # (links first, a node without a backup published its clients' wills to its own
        # departing subscribers only).
        for listener in self.listeners:
            await listener.stop()
        if self.cluster is not None:
            try:
                async with asyncio.timeout(STOP_DRAIN_TIMEOUT):
                    await self.cluster.drain()
            except TimeoutError:
                self.cluster.log_undrained(STOP_DRAIN_TIMEOUT)
            await self.cluster.stop()
        if self.admin is not None:
            await self.admin.stop()
        await self.store.close()
        logger.info("node %s stopped", self.config.node_name)
