# When each client connection's next timeout falls due, without a timer per request
# and without sweeping every connection: a connection is filed under the tick (of
# TICK_S) its earliest deadline falls in, and each tick checks only what is filed up
# to it. Filing is lazy: a deadline that moves later needs nothing (the connection is
# checked at the earlier time, finds nothing due and files itself again); only one
# that moves earlier than what is filed files it again.
import heapq

import cython

# A timeout fires at most one tick (plus the loop's own delay) after it is due.
TICK_S = 0.02
_NEVER = float("inf")


class Deadlines:
    """The filed deadlines of one worker's connections. A connection has a `filed_at`
    field (seconds on the worker's monotonic clock; inf when nothing is filed) and a
    `check_deadline(now)` method, which files it again for its next deadline."""

    def __init__(self):
        self.slots = {}        # tick number -> connections filed under it
        self.ticks = []        # heap of the tick numbers in `slots`

    def file(self, connection, at):
        """Check `connection` at `at` (monotonic seconds) unless it is already filed
        for that time or earlier."""
        if at >= connection.filed_at:
            return
        connection.filed_at = at
        tick: cython.longlong = int(at / TICK_S) + 1      # never checked before `at`
        slot = self.slots.get(tick)
        if slot is None:
            self.slots[tick] = [connection]
            heapq.heappush(self.ticks, tick)
        else:
            slot.append(connection)

    def check(self, now):
        """Check every connection whose filed deadline is due at `now`."""
        ticks = self.ticks
        slots = self.slots
        last: cython.longlong = int(now / TICK_S)
        while ticks and ticks[0] <= last:
            for connection in slots.pop(heapq.heappop(ticks)):
                # An entry left behind by a later filing of the same connection is skipped.
                if connection.filed_at <= now:
                    connection.filed_at = _NEVER
                    connection.check_deadline(now)

    def __len__(self):
        return sum(len(slot) for slot in self.slots.values())
