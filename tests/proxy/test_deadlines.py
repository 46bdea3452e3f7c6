# The deadline heap: a filed connection is checked once its deadline is due, never
# before, however its deadlines move (later: lazily; earlier: filed again).
from hypothesis import given
from hypothesis import strategies as st

from proxy.deadlines import Deadlines

NEVER = float("inf")


class Connection:
    """What Deadlines needs of a client connection: its filed time, and a check that
    fires the timeout when it is due and otherwise files the connection again."""

    def __init__(self, deadlines):
        self.deadlines = deadlines
        self.filed_at = NEVER
        self.deadline = NEVER
        self.checks = []               # (now, deadline at that check)
        self.fired = []                # (now, deadline) of each timeout that fired

    def set_deadline(self, at):
        self.deadline = at
        self.deadlines.file(self, at)

    def check_deadline(self, now):
        self.checks.append((now, self.deadline))
        if self.deadline <= now:
            self.fired.append((now, self.deadline))
            self.deadline = NEVER
        else:
            self.deadlines.file(self, self.deadline)


# (connection, seconds from now, moved later without filing (as a busy connection does), time passing)
moves = st.lists(st.tuples(st.integers(0, 4), st.floats(0, 100), st.booleans(), st.floats(0, 5)), max_size=80)


@given(moves)
def test_every_due_deadline_fires_at_the_first_check_after_it_and_never_before(steps):
    deadlines = Deadlines()
    connections = [Connection(deadlines) for _ in range(5)]
    now = 0.0
    for index, seconds, lazily, passing in steps:
        connection = connections[index]
        at = now + seconds
        if lazily and connection.deadline < at < NEVER:
            connection.deadline = at               # later: the filing stays as it was
        else:
            connection.set_deadline(at)
        now += passing
        deadlines.check(now)
        for each in connections:
            assert each.deadline > now             # nothing due is left unfired
            assert all(checked_at >= due for checked_at, due in each.fired)


def test_a_deadline_moved_later_is_checked_once_at_the_old_time_and_then_at_the_new():
    deadlines = Deadlines()
    connection = Connection(deadlines)
    connection.set_deadline(10.0)
    connection.deadline = 30.0                # moved later: nothing filed
    deadlines.check(10.0)
    assert connection.checks == [(10.0, 30.0)]
    deadlines.check(29.9)
    assert len(connection.checks) == 1
    deadlines.check(30.0)
    assert connection.checks[-1] == (30.0, 30.0)
    assert deadlines.next_at == NEVER


def test_a_deadline_moved_earlier_wakes_the_worker_for_the_earlier_time():
    woken = []
    deadlines = Deadlines(woken.append)
    connection = Connection(deadlines)
    connection.set_deadline(10.0)
    connection.set_deadline(4.0)
    other = Connection(deadlines)
    other.set_deadline(7.0)                   # not the earliest: no new wake
    assert woken == [10.0, 4.0]
    deadlines.check(4.0)
    assert connection.checks == [(4.0, 4.0)]
    assert deadlines.next_at == 7.0           # the stale entry at 10 is skipped when reached
    deadlines.check(10.0)
    assert len(connection.checks) == 1 and other.checks == [(10.0, 7.0)]
