"""Prometheus metrics, one registry per daemon.

Owns: the name, labels and meaning of every metric. Metrics are named after decisions
(a write issued, a conflict, a document refused), so an operator can see why the daemon
did what it did. Never does I/O; the HTTP module renders the registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.transitions = Counter(
            "presenced_transitions", "Status changes written, by reason and new status",
            ["reason", "status"], registry=r,
        )
        self.writes = Counter(
            "presenced_status_writes", "users status writes, by result (written, conflict,"
            " failed)", ["result"], registry=r,
        )
        self.malformed = Counter(
            "presenced_malformed_documents", "Malformed documents, once per document and"
            " distinct content (feed events: each one), by reason", ["reason"], registry=r,
        )
        self.feed_keys = Counter(
            "presenced_feed_keys", "Changes received from the feed, by kind", ["kind"],
            registry=r,
        )
        self.feed_errors = Counter(
            "presenced_mongodb_errors", "Failed MongoDB operations, by component",
            ["component"], registry=r,
        )
        self.reconciliations = Counter(
            "presenced_reconciliations", "Full reconciliations, by cause", ["cause"], registry=r
        )
        self.reaped = Counter(
            "presenced_reaped_connections", "Connections removed from usersSessions by the"
            " reaper (stale or of a dead instance)", registry=r,
        )
        self.users_tracked = Gauge("presenced_users_tracked", "Users held in memory", registry=r)
        self.pending_writes = Gauge(
            "presenced_pending_writes", "Status writes in flight", registry=r
        )
        self.feed_lag = Gauge(
            "presenced_feed_lag_seconds", "Seconds the feed is behind: since it last answered,"
            " or the oplog's own lag; NaN until it first answered", registry=r
        )
        self.broker_connected = Gauge(
            "presenced_broker_connected", "1 while connected to the service broker's NATS"
            " (TRANSPORTER); 0 while not; absent without a broker", registry=r,
        )
        self.broker_nodes = Gauge(
            "presenced_broker_nodes", "Other broker nodes currently available", registry=r
        )
        self.broker_requests = Counter(
            "presenced_broker_requests", "presence.* actions served on the broker, by action"
            " and outcome (ok, error, unknown_action)", ["action", "outcome"], registry=r,
        )
        self.broker_events = Counter(
            "presenced_broker_events", "Broker events, by event and outcome (sent: one per"
            " listening node; dropped: broker unreachable; received)", ["event", "outcome"],
            registry=r,
        )
        self.broker_malformed = Counter(
            "presenced_broker_malformed_packets", "Broker packets that could not be used, by"
            " kind", ["kind"], registry=r,
        )
        self.broker_lost_nodes = Counter(
            "presenced_broker_lost_nodes", "Broker nodes lost (heartbeat timeout or clean"
            " disconnect), whose connections were then removed", registry=r,
        )
        self.ready = Gauge(
            "presenced_ready", "1 when /ready answers 200 (computed at scrape time)", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
