# decide(): may this request proceed, from the customer's edge state, the request's
# facts and `now`. Rules apply in this order and the first that refuses wins:
#   1 subscription not active -> 403   2 feature not in plan -> 403
#   3 hard quota exhausted -> 429      4 margin level 3 (block, or a locked feature) -> 429
#   5 margin level 2 throttle bucket empty -> 429     otherwise allowed
#     (at level 2 with `X-Aforo-Throttle: true`).
# Quota and margin state belong to the current period: once `now` reaches period_end
# they are ignored until the control plane sends the new period.

from decision_core.state import OVERALL, SUBSCRIPTION_STATUSES

ALLOW = 0            # forward untouched (plus quota headers)
ALLOW_THROTTLED = 1  # forward, with X-Aforo-Throttle: true
REJECT = 2           # answer from the edge with `status`, never forwarded

REASON_ALLOWED = "allowed"
REASON_THROTTLE = "throttle"                    # allowed at level 2
REASON_SUBSCRIPTION_INACTIVE = "subscription_inactive"
REASON_FEATURE_NOT_ENTITLED = "feature_not_entitled"
REASON_QUOTA_EXCEEDED = "quota_exceeded"
REASON_MARGIN_BLOCKED = "margin_blocked"
REASON_FEATURE_LOCKED = "feature_locked"
REASON_THROTTLED = "throttled"                  # level-2 rate exceeded

TITLES = {
    REASON_ALLOWED: "OK",
    REASON_THROTTLE: "OK",
    REASON_SUBSCRIPTION_INACTIVE: "Subscription Not Active",
    REASON_FEATURE_NOT_ENTITLED: "Feature Not In Plan",
    REASON_QUOTA_EXCEEDED: "Quota Exceeded",
    REASON_MARGIN_BLOCKED: "Margin Limit Exceeded",
    REASON_FEATURE_LOCKED: "Margin Limit Exceeded",
    REASON_THROTTLED: "Throttled",
}

HEADER_RATELIMIT_POLICY = "RateLimit-Policy"
HEADER_RATELIMIT = "RateLimit"
HEADER_RETRY_AFTER = "Retry-After"
HEADER_THROTTLE = "X-Aforo-Throttle"
HEADER_SHADOW = "X-Aforo-Shadow"


class Decision:
    """The outcome of decide(): ALLOW, ALLOW_THROTTLED or REJECT.

    status: 0 when forwarded (the upstream answers), else the edge's status code.
    reason: machine-readable cause (REASON_*); title and detail: for the problem body.
    retry_after_s: seconds for Retry-After (0 = none). guard_id: the guard that
    acted, if any. shadow: what a shadow-mode guard would have done ("" = nothing).
    The response header values are fields (quota_policy, quota_status: "" when the
    metric has no quota) so the proxy can write them without building containers;
    `headers` gives them as (name, value) pairs. model_map: the model downgrades of
    the level-2 guard that throttles this request (requested model -> model to
    serve), None when no acting guard downgrades.
    """

    @property
    def title(self):
        """Short title for the problem body ("Margin Limit Exceeded", ...)."""
        return TITLES[self.reason]

    @property
    def headers(self):
        """Response header fields to add, as a tuple of (name, value) pairs."""
        fields = []
        if self.quota_policy:
            fields.append((HEADER_RATELIMIT_POLICY, self.quota_policy))
            fields.append((HEADER_RATELIMIT, self.quota_status))
        if self.retry_after_s:
            fields.append((HEADER_RETRY_AFTER, str(self.retry_after_s)))
        if self.outcome == ALLOW_THROTTLED:
            fields.append((HEADER_THROTTLE, "true"))
        if self.shadow:
            fields.append((HEADER_SHADOW, self.shadow))
        return tuple(fields)

    def __repr__(self):
        return (
            f"Decision(outcome={self.outcome}, status={self.status}, reason={self.reason!r}, "
            f"retry_after_s={self.retry_after_s}, headers={self.headers!r}, "
            f"guard_id={self.guard_id!r}, shadow={self.shadow!r})"
        )


def _decision(outcome, status, reason, detail, retry_after_s, quota_policy, quota_status, guard_id, shadow,
              model_map=None):
    decision = Decision.__new__(Decision)
    decision.outcome = outcome
    decision.status = status
    decision.reason = reason
    decision.detail = detail
    decision.retry_after_s = retry_after_s
    decision.quota_policy = quota_policy
    decision.quota_status = quota_status
    decision.guard_id = guard_id
    decision.shadow = shadow
    decision.model_map = model_map
    return decision


ALLOWED = _decision(ALLOW, 0, REASON_ALLOWED, "", 0, "", "", "", "")
# Refusals that depend on nothing but a name are built once and shared.
_INACTIVE = {
    status: _decision(REJECT, 403, REASON_SUBSCRIPTION_INACTIVE, f"subscription is {status}", 0, "", "", "", "")
    for status in SUBSCRIPTION_STATUSES
}
_NOT_ENTITLED = {}
_OVERALL_KEY = OVERALL


def _not_entitled(feature):
    decision = _NOT_ENTITLED.get(feature)
    if decision is None:
        decision = _decision(
            REJECT, 403, REASON_FEATURE_NOT_ENTITLED,
            f"feature {feature!r} is not in the customer's plan", 0, "", "", "", "",
        )
        # Features come from route configuration, so this stays as small as the route table.
        _NOT_ENTITLED[feature] = decision
    return decision


def _ceil_seconds(seconds):
    # Whole seconds for Retry-After / reset, at least 1 so a client never retries at once.
    whole = int(seconds)
    if whole < seconds:
        whole += 1
    return whole if whole > 1 else 1


def _margin_action(standing, facts, now, reset_s):
    # Returns (reason, retry_after_s) for what `standing` does to this request, or
    # ("", 0) when it lets it through untouched. Level 2 takes a token from the bucket.
    level = standing.level
    if level == 3:
        if not standing.locked_features:
            return REASON_MARGIN_BLOCKED, reset_s
        for feature in facts.features:
            if feature in standing.locked_features:
                return REASON_FEATURE_LOCKED, reset_s
        return "", 0
    if level == 2:
        wait_s = standing.bucket.take(now)
        if wait_s > 0.0:
            return REASON_THROTTLED, _ceil_seconds(wait_s)
        return REASON_THROTTLE, 0
    return "", 0


def _margin_detail(reason, standing, facts):
    if reason == REASON_MARGIN_BLOCKED:
        return standing.block_detail
    if reason == REASON_FEATURE_LOCKED:
        locked = [f for f in facts.features if f in standing.locked_features]
        return f"margin guard {standing.guard_id!r} locks feature {locked[0]!r} until the next billing period"
    return standing.throttle_detail


def _standings(levels, facts):
    # The standings of the request's metric, of the other metrics it meters, then
    # overall (None where there is none); empty for no standings at all.
    if levels is None:
        return []
    standings = [levels.get(facts.metric)]
    for metric in facts.other_metrics:
        standings.append(levels.get(metric))
    standings.append(levels.get(_OVERALL_KEY))
    return standings


def decide(customer, facts, now):
    """Decide one request.

    customer: CustomerState; facts: RequestFacts; now: seconds on the same clock as
    customer.period_end. Returns a Decision (see the rule order at the top of this
    module). The guard standings of the request's metric, of its other metrics
    (facts.other_metrics) and overall all apply: every enforcing one acts (blocks
    before throttles, in that order); shadow-mode standings, held beside the
    enforcing ones, only report in `shadow`. Only level-2 buckets change: decide() never
    counts usage. A period that has ended (now >= period_end) ignores quota and
    margin state. Retry-After is at least 1 second.
    """
    if not customer.subscription_open:
        return _INACTIVE[customer.subscription_status]
    for feature in facts.features:
        if feature not in customer.features:
            return _not_entitled(feature)
    if now >= customer.period_end:
        return ALLOWED
    reset_s = _ceil_seconds(customer.period_end - now)

    quota_policy = ""
    quota_status = ""
    slot = customer.quotas.slot(facts.metric)
    if slot >= 0:
        quota = customer.quotas.limit_at(slot)
        used = customer.used[slot]
        quota_policy = quota.policy_header
        if quota.admits(used, facts.units):
            # What the customer has left once this request is served.
            quota_status = quota.ratelimit_header(used + customer.report_offset[slot] + facts.units, reset_s)
        else:
            return _quota_exceeded(quota, used + customer.report_offset[slot], reset_s)

    levels = customer.acting_levels
    shadows = customer.shadow_levels
    if levels is None and shadows is None:
        if slot < 0:
            return ALLOWED
        return _decision(ALLOW, 0, REASON_ALLOWED, "", 0, quota_policy, quota_status, "", "")

    standings = _standings(levels, facts)
    # Blocks first, so a blocked request takes no throttle token.
    for standing in standings:
        if standing is not None and standing.level == 3:
            reason, retry_after_s = _margin_action(standing, facts, now, reset_s)
            if reason:
                return _decision(
                    REJECT, 429, reason, _margin_detail(reason, standing, facts), retry_after_s,
                    quota_policy, _unserved_status(customer, slot, reset_s), standing.guard_id, "",
                )
    outcome = ALLOW
    acting_guard = ""
    model_map = None
    for standing in standings:
        if standing is not None and standing.level == 2:
            reason, retry_after_s = _margin_action(standing, facts, now, reset_s)
            if reason == REASON_THROTTLED:
                return _decision(
                    REJECT, 429, reason, _margin_detail(reason, standing, facts), retry_after_s,
                    quota_policy, _unserved_status(customer, slot, reset_s), standing.guard_id, "",
                )
            outcome = ALLOW_THROTTLED
            acting_guard = standing.guard_id
            if model_map is None:
                model_map = standing.model_map      # the metric's guard first

    # Shadow guards are judged beside the enforcing ones (their own buckets move) and
    # only report what they would have done.
    shadow = ""
    for standing in _standings(shadows, facts):
        if standing is not None:
            reason, retry_after_s = _margin_action(standing, facts, now, reset_s)
            if reason and not shadow:
                shadow = f"{reason}; guard={standing.guard_id}"

    if outcome == ALLOW and slot < 0 and not shadow:
        return ALLOWED
    return _decision(
        outcome, 0, REASON_THROTTLE if outcome == ALLOW_THROTTLED else REASON_ALLOWED,
        "", 0, quota_policy, quota_status, acting_guard, shadow, model_map,
    )


def _unserved_status(customer, slot, reset_s):
    # The RateLimit value for a request refused after its quota admitted it: what is
    # left without it ("" for a metric without a quota).
    if slot < 0:
        return ""
    return customer.quotas.limit_at(slot).ratelimit_header(customer.used[slot] + customer.report_offset[slot], reset_s)


def _quota_exceeded(quota, used, reset_s):
    return _decision(
        REJECT, 429, REASON_QUOTA_EXCEEDED,
        f"the hard quota of {quota.limit} {quota.metric} for this billing period is used up",
        reset_s, quota.policy_header, quota.ratelimit_header(used, reset_s), "", "",
    )


def quota_refusal(customer, metric, units, now):
    """The 429 Decision when `units` more of `metric` do not fit the customer's hard
    quota now; None when they fit, the plan sets no quota on `metric`, or the period
    has ended (its quota no longer applies). Counts nothing. For units known only
    once a request's body is read (an LLM call's token estimate), after decide()."""
    slot = customer.quotas.slot(metric)
    if slot < 0 or now >= customer.period_end:
        return None
    quota = customer.quotas.limit_at(slot)
    used = customer.used[slot]
    if quota.admits(used, units):
        return None
    return _quota_exceeded(quota, used + customer.report_offset[slot], _ceil_seconds(customer.period_end - now))


def ratelimit_fields(customer, metrics, now):
    """The `RateLimit-Policy` and `RateLimit` field values for those of `metrics`
    the customer's plan sets a quota on, in that order (a list, as the draft
    writes several policies), from what the customer has used now; ("", "") for
    none, or once the period has ended."""
    if now >= customer.period_end:
        return "", ""
    reset_s = _ceil_seconds(customer.period_end - now)
    policies = []
    statuses = []
    for metric in metrics:
        slot = customer.quotas.slot(metric)
        if slot >= 0:
            quota = customer.quotas.limit_at(slot)
            policies.append(quota.policy_header)
            statuses.append(quota.ratelimit_header(customer.used[slot] + customer.report_offset[slot], reset_s))
    return ", ".join(policies), ", ".join(statuses)
