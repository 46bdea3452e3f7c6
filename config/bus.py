# The names proxies and control-plane workers share on the Redis edge bus. Every key
# carries the hash tag `{aforo}`, so on Redis Cluster they all live in one slot and
# multi-key commands stay legal.
#
# Meter events: a stream; each entry is one batch from one proxy worker, its field
# `events` the batch as NDJSON usage events (the body POST /v1/events takes). Control
# plane workers read it in the consumer group METER_GROUP, keep the events (once each,
# by id), then acknowledge and delete the entry.
METER_STREAM = "{aforo}:meter-events"
# Where the bus is, in settings files: `redis://host:port/db`, `rediss://` (TLS) or `unix://`.
REDIS_URL_PATTERN = r"^(redis|rediss|unix)://\S+$"
REDIS_URL_MEANING = "a Redis URL such as `redis://127.0.0.1:6379/0`"
METER_GROUP = "control-plane"
EVENTS_FIELD = "events"

# Edge state: the hash EDGE_STATE (fields `version`, `state`: the whole edge state
# as GET /v1/edge/state serves it) and the stream EDGE_CHANGES, whose entries carry a
# `version` and either `changes` (changed customers, as GET /v1/edge/changes answers)
# or `resync` (pull EDGE_STATE again). Versions come from INCR on EDGE_VERSION, so
# they rise across control planes and restarts; a follower that sees a gap resyncs.
EDGE_STATE = "{aforo}:edge:state"
EDGE_CHANGES = "{aforo}:edge:changes"
EDGE_VERSION = "{aforo}:edge:version"

# Hard-quota leases: one string per customer, metric and billing period (named by its
# end, epoch seconds), holding the units leased so far; it expires a day after the
# period. Metric names and customer ids may hold `:`, so the metric's length comes
# first and no two keys are alike.
QUOTA_LEDGER = "{aforo}:quota"
QUOTA_LEDGER_KEPT_AFTER_PERIOD_S = 86_400
# The ledgers' epoch: set (to a new random id) by a control plane once it has built
# every ledger of the current periods from the store's period totals. A Redis without
# it has lost its data (a restart without persistence, a flush, a failover to an empty
# replica) or was never seeded: no ledger grants anything until it is rebuilt, and
# units given back are taken only by the epoch they were leased in.
QUOTA_LEDGER_EPOCH = "{aforo}:quota-epoch"


def quota_ledger_key(customer_id: str, metric: str, period_end: float) -> str:
    """The ledger key of `customer_id`'s leases of `metric` in the period ending at
    `period_end`."""
    return f"{QUOTA_LEDGER}:{int(period_end)}:{len(metric)}:{metric}:{customer_id}"

# Level-2 throttles: one string per customer, guard and metric holding the shared bucket's
# state (the time its tokens are spent up to, epoch microseconds; see
# decision_core.bucket.shared_take); it expires once the bucket would be full again.
THROTTLE_BUCKET = "{aforo}:throttle"


def throttle_bucket_key(customer_id: str, guard_id: str, metric: str) -> str:
    """The shared throttle bucket of `customer_id` under the guard `guard_id` for
    `metric` (or `overall`)."""
    return f"{THROTTLE_BUCKET}:{len(guard_id)}:{guard_id}:{len(metric)}:{metric}:{customer_id}"
