"""Time decide() on realistic edge state, compiled and uncompiled, in one run.

    python -m bench.decision_core [--customers 10000] [--decisions 200000] [--repeats 5]

Builds 10,000 customers over free / pro / enterprise plans (quotas, entitlements,
guard standings at every level, a few inactive subscriptions), replays the same
seeded request mix through the compiled core and through the pure Python core
(AFORO_PURE_PYTHON=1) in child processes that alternate, so both meet the same
machine conditions; prints a table and, as its last line, a JSON object with
compiled_ns_per_decision, pure_ns_per_decision and speedup (best against best).
The time per decision includes the Python call and the loop that feeds it.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

T0 = 1_700_000_000.0
MONTH_S = 30 * 86400
SEED = 20261123
# Distinct (customer, route) pairs replayed in order; small enough that the harness's
# own list does not push the customers' state out of the CPU caches.
REQUEST_MIX = 20_000
STEP_S = 20e-6  # 50,000 requests/s of simulated time
PLAN_FEATURES = {"free": (), "pro": ("large_models",), "enterprise": ("large_models", "premium_compute")}
# (name, required features, metric, units)
ROUTES = (
    ("chat", ("large_models",), "ai_tokens", 800),
    ("reasoning", ("large_models",), "ai_reasoning_tokens", 2000),
    ("embeddings", (), "api_calls", 1),
    ("search", (), "enrichment_credits", 1),
    ("compute", ("premium_compute",), "api_calls", 1),
)


def build_workload(core, customers, decisions):
    """Seeded customers and a request list of (state, facts, now) for `core`."""
    rng = random.Random(SEED)
    period_end = T0 + 12 * 86400
    # Entitlements belong to the plan: customers on one plan share its feature set,
    # as the control plane's snapshot builder does.
    plan_features = {tier: frozenset(features) for tier, features in PLAN_FEATURES.items()}
    plan_quotas = {
        "free": core.PlanQuotas([core.QuotaLimit("api_calls", 1000, True, MONTH_S)]),
        "pro": core.PlanQuotas([
            core.QuotaLimit("api_calls", 100_000, True, MONTH_S),
            core.QuotaLimit("ai_tokens", 5_000_000, False, MONTH_S),
        ]),
        "enterprise": core.NO_QUOTAS,
    }
    states = []
    for index in range(customers):
        roll = rng.random()
        tier = "free" if roll < 0.4 else "pro" if roll < 0.85 else "enterprise"
        status = "past_due" if rng.random() < 0.02 else "active"
        features = plan_features[tier]
        usage = {}
        levels = {}
        if tier == "free":
            usage["api_calls"] = rng.randrange(0, 1001)
        elif tier == "pro":
            usage["api_calls"] = rng.randrange(0, 100_000)
            usage["ai_tokens"] = rng.randrange(0, 6_000_000)
        for metric in ("ai_tokens", "ai_reasoning_tokens", core.OVERALL):
            level = rng.choices((0, 1, 2, 3), weights=(80, 10, 7, 3))[0]
            if tier == "enterprise" and metric != core.OVERALL:
                continue
            bucket = core.TokenBucket(50, 1, 50, T0) if level == 2 else None
            locked = ("large_models",) if level == 3 and rng.random() < 0.5 else ()
            enforce = rng.random() < 0.8
            levels[metric] = core.GuardStanding(f"guard-{metric}", level, enforce, bucket, locked)
        states.append(
            core.CustomerState(f"cus_{index}", tier, status, features, plan_quotas[tier], usage, levels, period_end)
        )
    facts = [core.RequestFacts(features, metric, units) for _, features, metric, units in ROUTES]
    # Clients mostly call routes their plan includes; 5% of calls try any route.
    entitled = {
        tier: [f for f in facts if set(f.features) <= set(plan_features)]
        for tier, plan_features in PLAN_FEATURES.items()
    }
    requests = []
    for _ in range(min(decisions, REQUEST_MIX)):
        state = states[rng.randrange(customers)]
        choices = facts if rng.random() < 0.05 else entitled[state.tier]
        requests.append((state, choices[rng.randrange(len(choices))]))
    return requests


def measure(customers, decisions, repeats):
    """Best-of-`repeats` ns per decide() call and the outcome mix, for the loaded core."""
    import decision_core as core

    decide = core.decide
    outcomes = {}
    now = T0
    for state, facts in build_workload(core, customers, decisions):
        now += STEP_S
        reason = decide(state, facts, now).reason
        outcomes[reason] = outcomes.get(reason, 0) + 1
    passes, rest = divmod(decisions, REQUEST_MIX)
    best_ns = None
    for _ in range(repeats):
        requests = build_workload(core, customers, decisions)  # fresh buckets each repeat
        now = T0
        started = time.perf_counter_ns()
        for _ in range(passes):
            for state, facts in requests:
                now += STEP_S
                decide(state, facts, now)
        for state, facts in requests[:rest]:
            now += STEP_S
            decide(state, facts, now)
        elapsed = time.perf_counter_ns() - started
        best_ns = elapsed if best_ns is None else min(best_ns, elapsed)
    return {"compiled": core.COMPILED, "ns_per_decision": best_ns / decisions, "outcomes": outcomes}


def _run(pure, args):
    # One measurement in a child process, so both builds run under the same conditions.
    env = {key: value for key, value in os.environ.items() if key != "AFORO_PURE_PYTHON"}
    if pure:
        env["AFORO_PURE_PYTHON"] = "1"
    child = subprocess.run(
        [sys.executable, "-m", "bench.decision_core", "--measure-only", "--customers", str(args.customers),
         "--decisions", str(args.decisions), "--repeats", str(args.repeats)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per process (best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="compiled/pure process pairs, interleaved")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_only:
        print(json.dumps(measure(args.customers, args.decisions, args.repeats)))
        return 0

    runs = {"compiled": [], "pure": []}
    for _ in range(args.rounds):
        runs["compiled"].append(_run(False, args))
        runs["pure"].append(_run(True, args))
    if not all(run["compiled"] for run in runs["compiled"]):
        print("the compiled decision core is not loaded: build it with `pip install -e .`", file=sys.stderr)
        return 1
    if any(run["compiled"] for run in runs["pure"]):
        print("the pure-Python run loaded the compiled core", file=sys.stderr)
        return 1

    best = {name: min(run["ns_per_decision"] for run in results) for name, results in runs.items()}
    speedup = best["pure"] / best["compiled"]
    print(f"decide() on {args.customers:,} customers, {args.decisions:,} decisions, "
          f"best of {args.repeats} passes x {args.rounds} interleaved processes")
    print(f"{'core':<10}{'best ns':>10}{'median ns':>11}{'decisions/s':>14}")
    for name, results in runs.items():
        times = sorted(run["ns_per_decision"] for run in results)
        print(f"{name:<10}{best[name]:>10.0f}{statistics.median(times):>11.0f}{1e9 / best[name]:>14,.0f}")
    print(f"speedup   {speedup:.1f}x   (targets: compiled <= 1000 ns, speedup >= 5x)")
    outcomes = runs["compiled"][0]["outcomes"]
    mix = ", ".join(f"{reason} {count * 100 / sum(outcomes.values()):.1f}%" for reason, count in sorted(outcomes.items()))
    print(f"outcome mix: {mix}")
    print(json.dumps({
        "customers": args.customers,
        "decisions": args.decisions,
        "compiled_ns_per_decision": round(best["compiled"], 1),
        "pure_ns_per_decision": round(best["pure"], 1),
        "speedup": round(speedup, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
