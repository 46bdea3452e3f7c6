# When each client connection's next timeout falls due, without a timer per request
# and without sweeping every connection: connections are kept in a heap by their
# earliest deadline, and the worker wakes when the first one is due. Filing is lazy:
# a deadline that moves later needs nothing (the connection is checked at the earlier
# time, finds nothing due and files itself again); only one that moves earlier than
# what is filed is filed again. So a busy keep-alive connection is filed about once
# per header timeout, not once per request.
import heapq

_NEVER = float("inf")


class Deadlines:
    """The filed deadlines of one worker's connections. A connection has a `filed_at`
    field (seconds on the worker's monotonic clock; inf when nothing is filed) and a
    `check_deadline(now)` method, which files it again for its next deadline.
    `wake(at)` is called whenever the earliest filed deadline becomes `at`."""

    def __init__(self, wake=None):
        self.heap = []        # (at, filing number, connection)
        self.filings = 0      # orders equal deadlines, so connections are never compared
        self.wake = wake

    def file(self, connection, at):
        """Check `connection` at `at` (monotonic seconds) unless it is already filed
        for that time or earlier."""
        if at >= connection.filed_at:
            return
        connection.filed_at = at
        self.filings += 1
        heapq.heappush(self.heap, (at, self.filings, connection))
        if self.wake is not None and self.heap[0][2] is connection:
            self.wake(at)

    def check(self, now):
        """Check every connection whose filed deadline is due at `now`."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            at, _, connection = heapq.heappop(heap)
            # An entry left behind by an earlier filing of the same connection is skipped.
            if connection.filed_at == at:
                connection.filed_at = _NEVER
                connection.check_deadline(now)

    @property
    def next_at(self):
        """The earliest filed deadline (inf when none)."""
        return self.heap[0][0] if self.heap else _NEVER
