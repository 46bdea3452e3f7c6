# Meter events survive every failure the proxy can see: a failing sink (kept and retried
# in order), a full memory buffer (spooled to disk and replayed), shutdown (spooled and
# replayed by the next start); only an unwritable spool loses events, counted and logged.
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.meter_event import EventIds, decode_ndjson, new_event_id, process_id_prefix
from proxy.metering import MeterBuffer, MeterEvent, MeterSink, NdjsonFileSink

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class RecordingSink:
    """Stores batches; fails while `down` or for its first `fail_first` batches."""

    def __init__(self, fail_first=0):
        self.batches = []
        self.calls = 0
        self.fail_first = fail_first
        self.down = False

    async def write_batch(self, events):
        self.calls += 1
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionError("ingest unavailable")
        if self.down:
            raise ConnectionError("ingest unavailable")
        self.batches.append(list(events))

    async def close(self):
        pass

    @property
    def ids(self):
        return [event.id for batch in self.batches for event in batch]


class SinkDownAfter(RecordingSink):
    """Accepts `good_batches` more batches, then is down (None: never goes down)."""

    def __init__(self, good_batches=None):
        super().__init__()
        self.good_batches = good_batches

    async def write_batch(self, events):
        if self.good_batches is not None:
            if self.good_batches == 0:
                self.down = True
            self.good_batches -= 1
        await super().write_batch(events)


def event(n):
    return MeterEvent(id=f"{n:032x}", customer_id=f"cus_{n % 7}", metric="api_calls", quantity=1 + n % 3,
                      timestamp=1_700_000_000.0 + n / 1000, route="chat", status=200,
                      request_bytes=120 + n, response_bytes=2048, latency_ms=12.5)


def ids(numbers):
    return [f"{n:032x}" for n in numbers]


def new_buffer(sink, spool_dir, clock, **options):
    settings_ = dict(capacity_events=100, batch_events=10, flush_interval_s=1.0)
    settings_.update(options)
    return MeterBuffer(sink, spool_dir=spool_dir, loop=asyncio.get_running_loop(), clock=clock, **settings_)


def spool_files(spool_dir):
    # Every file in the spool, its journal included.
    return sorted(str(p.relative_to(spool_dir)) for p in Path(spool_dir).rglob("*") if p.is_file())


def test_sinks_satisfy_the_protocol(tmp_path):
    assert isinstance(RecordingSink(), MeterSink)
    assert isinstance(NdjsonFileSink(tmp_path / "meter.ndjson"), MeterSink)


@pytest.mark.parametrize("failures", [1, 3, 8])
def test_a_failing_sink_loses_nothing_keeps_order_and_writes_each_event_once(tmp_path, failures):
    expected_delays = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0][:failures]

    async def scenario():
        clock = FakeClock()
        sink = RecordingSink(fail_first=failures)
        buffer = new_buffer(sink, tmp_path, clock)
        for n in range(35):
            buffer.record(event(n))
        assert await buffer.flush_due() == 0
        for delay in expected_delays:
            # The retry waits out its back-off: nothing is sent a moment before it ends.
            clock.advance(delay - 0.01)
            assert await buffer.flush_due() == 0
            calls = sink.calls
            clock.advance(0.02)
            await buffer.flush_due()
            assert sink.calls > calls
        assert sink.ids == ids(range(30))           # full batches; 5 wait for the interval
        clock.advance(1.0)
        assert await buffer.flush_due() == 5
        assert sink.ids == ids(range(35))
        assert [len(batch) for batch in sink.batches] == [10, 10, 10, 5]
        assert buffer.sink_errors_total == failures
        assert (buffer.recorded_total, buffer.flushed_total, buffer.depth, buffer.lost_total) == (35, 35, 0, 0)

    asyncio.run(scenario())


def test_a_partial_batch_waits_for_the_flush_interval(tmp_path):
    async def scenario():
        clock = FakeClock()
        sink = RecordingSink()
        buffer = new_buffer(sink, tmp_path, clock, flush_interval_s=2.0)
        for n in range(3):
            buffer.record(event(n))
        clock.advance(1.99)
        assert await buffer.flush_due() == 0
        clock.advance(0.01)
        assert await buffer.flush_due() == 3
        assert sink.ids == ids(range(3))

    asyncio.run(scenario())


class StalledSink(RecordingSink):
    """Hangs inside write_batch until released; signals when `expected` ids arrived."""

    def __init__(self, expected):
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.all_arrived = asyncio.Event()
        self.expected = expected

    async def write_batch(self, events):
        self.entered.set()
        await self.release.wait()
        await super().write_batch(events)
        if len(self.ids) >= self.expected:
            self.all_arrived.set()


def test_overflow_spills_to_disk_without_blocking_and_replays_oldest_first(tmp_path):
    spool_dir = tmp_path / "spool"

    async def scenario():
        sink = StalledSink(expected=1000)
        buffer = new_buffer(sink, spool_dir, FakeClock(), capacity_events=10, batch_events=5)
        runner = asyncio.create_task(buffer.run())
        for n in range(5):
            buffer.record(event(n))
        await sink.entered.wait()                   # the delivery task is stuck in the sink
        for n in range(5, 1000):
            assert buffer.record(event(n)) is None  # synchronous: returns with the sink stalled
        # Full chunks (3 of 256) already reached the disk; the rest waits in memory for
        # its chunk, and only what is on disk counts as spooled.
        assert (buffer.depth, buffer.spilled_total, buffer.spooled_events) == (10 + 222, 990, 768)
        assert spool_files(spool_dir)
        buffer.commit()                             # the group commit writes the partial chunk too
        assert (buffer.depth, buffer.spooled_events) == (10, 990)
        assert sink.ids == []
        sink.release.set()
        await sink.all_arrived.wait()
        await buffer.close(timeout_s=5.0)
        await runner
        assert sink.ids == ids(range(1000))
        assert (buffer.flushed_total, buffer.spooled_events, buffer.lost_total) == (1000, 0, 0)
        assert spool_files(spool_dir) == []

    asyncio.run(scenario())


def test_close_delivers_memory_and_spool_to_a_working_sink(tmp_path):
    async def scenario():
        sink = RecordingSink()
        sink.down = True
        buffer = new_buffer(sink, tmp_path, FakeClock(), capacity_events=10, batch_events=5,
                            spill_chunk_events=64, segment_events=100)
        for n in range(500):
            buffer.record(event(n))
        assert await buffer.flush_due() == 0
        sink.down = False
        await buffer.close(timeout_s=5.0)
        assert sink.ids == ids(range(500))
        assert (buffer.depth, buffer.spooled_events) == (0, 0)
        assert spool_files(tmp_path) == []

    asyncio.run(scenario())


def test_close_with_the_sink_down_spools_everything_for_the_next_start(tmp_path):
    async def first_run():
        sink = RecordingSink()
        sink.down = True
        buffer = new_buffer(sink, tmp_path, FakeClock())
        for n in range(25):
            buffer.record(event(n))
        await buffer.close(timeout_s=0.05)          # shorter than the first back-off: one attempt
        assert sink.ids == []
        assert (buffer.depth, buffer.spooled_events, buffer.lost_total) == (0, 25, 0)
        buffer.record(event(25))                    # a response completing after close
        assert buffer.spooled_events == 26

    async def next_run():
        sink = RecordingSink()
        buffer = new_buffer(sink, tmp_path, FakeClock())
        assert buffer.spooled_events == 26
        for n in range(26, 30):
            buffer.record(event(n))                 # queue behind the older spooled events
        await buffer.flush_due()
        assert sink.ids == ids(range(30))
        assert spool_files(tmp_path) == []
        await buffer.close(timeout_s=1.0)

    asyncio.run(first_run())
    assert spool_files(tmp_path)
    asyncio.run(next_run())


def test_close_in_the_middle_of_a_replay_spools_only_what_was_not_delivered(tmp_path):
    async def first_run():
        clock = FakeClock()
        sink = SinkDownAfter(good_batches=0)
        buffer = new_buffer(sink, tmp_path, clock, capacity_events=10, batch_events=5)
        for n in range(50):
            buffer.record(event(n))
        await buffer.flush_due()                    # down: memory 10, spool 40
        sink.down, sink.good_batches = False, 3
        clock.advance(1.0)
        await buffer.flush_due()                    # memory (2 batches), 1 spool batch, then down
        assert sink.ids == ids(range(15))
        for n in range(50, 53):
            buffer.record(event(n))
        await buffer.close(timeout_s=0.05)
        assert buffer.spooled_events == 38
        return sink.ids

    async def next_run():
        sink = RecordingSink()
        buffer = new_buffer(sink, tmp_path, FakeClock(), capacity_events=10, batch_events=5)
        assert buffer.spooled_events == 38
        await buffer.flush_due()
        return sink.ids

    delivered = asyncio.run(first_run()) + asyncio.run(next_run())
    assert delivered == ids(range(53))
    assert spool_files(tmp_path) == []


def test_an_unwritable_spool_counts_and_logs_every_lost_event(tmp_path, caplog):
    not_a_directory = tmp_path / "spool"
    not_a_directory.write_text("a file where the spool directory should be")

    async def scenario():
        sink = RecordingSink()
        sink.down = True
        with caplog.at_level(logging.ERROR, logger="aforo.metering"):
            buffer = new_buffer(sink, not_a_directory, FakeClock(), capacity_events=10, spill_chunk_events=1)
            assert "unusable" in caplog.text
            caplog.clear()
            for n in range(15):
                assert buffer.record(event(n)) is None
        assert (buffer.depth, buffer.lost_total, buffer.spooled_events) == (10, 5, 0)
        lost_messages = [r for r in caplog.records if r.levelno == logging.ERROR and "lost" in r.getMessage()]
        assert len(lost_messages) == 5
        sink.down = False
        assert await buffer.flush_due() == 10
        assert buffer.recorded_total == buffer.flushed_total + buffer.lost_total

    asyncio.run(scenario())


def test_close_with_an_unwritable_spool_and_the_sink_down_counts_the_loss(tmp_path, caplog):
    not_a_directory = tmp_path / "spool"
    not_a_directory.write_text("")

    async def scenario():
        sink = RecordingSink()
        sink.down = True
        buffer = new_buffer(sink, not_a_directory, FakeClock())
        for n in range(7):
            buffer.record(event(n))
        with caplog.at_level(logging.ERROR, logger="aforo.metering"):
            await buffer.close(timeout_s=0.05)
        assert buffer.lost_total == 7
        assert "7 meter events lost" in caplog.text

    asyncio.run(scenario())


def test_a_torn_line_in_the_spool_is_counted_as_lost_and_the_rest_replayed(tmp_path, caplog):
    async def first_run():
        sink = RecordingSink()
        sink.down = True
        buffer = new_buffer(sink, tmp_path, FakeClock())
        for n in range(4):
            buffer.record(event(n))
        await buffer.close(timeout_s=0.05)

    async def next_run():
        sink = RecordingSink()
        buffer = new_buffer(sink, tmp_path, FakeClock())
        with caplog.at_level(logging.ERROR, logger="aforo.metering"):
            await buffer.flush_due()
        assert sink.ids == ids(range(4))
        assert buffer.lost_total == 1
        assert "torn write" in caplog.text

    asyncio.run(first_run())
    (segment,) = Path(tmp_path).iterdir()
    with open(segment, "ab") as segment_file:
        segment_file.write(b'{"id":"0000000')       # a crash in the middle of a line
    asyncio.run(next_run())


def test_run_exits_when_close_begins_and_delivers_full_batches_on_its_own(tmp_path):
    class SignallingSink(RecordingSink):
        def __init__(self):
            super().__init__()
            self.delivered = asyncio.Event()

        async def write_batch(self, events):
            await super().write_batch(events)
            self.delivered.set()

    async def scenario():
        sink = SignallingSink()
        buffer = new_buffer(sink, tmp_path, FakeClock(), flush_interval_s=3600.0)
        runner = asyncio.create_task(buffer.run())
        for n in range(10):
            buffer.record(event(n))                 # a full batch wakes the task
        await sink.delivered.wait()
        assert sink.ids == ids(range(10))
        buffer.record(event(10))
        await buffer.close(timeout_s=1.0)
        assert runner.done()
        assert sink.ids == ids(range(11))

    asyncio.run(scenario())


# What happens to a buffer, step by step: events recorded, the sink up for some batches
# (None: for good), time passing and a delivery pass, a group commit.
BUFFER_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(1, 30)),
        st.tuples(st.just("sink"), st.one_of(st.none(), st.integers(0, 4))),
        st.tuples(st.just("flush"), st.floats(0.0, 6.0)),
        st.tuples(st.just("commit"), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 12),
    batch=st.integers(1, 12),
    chunk=st.integers(1, 6),
    segment=st.integers(1, 9),
    steps=BUFFER_STEPS,
)
def test_every_recorded_event_is_delivered_once_in_order(capacity, batch, chunk, segment, steps):
    batch = min(batch, capacity)

    async def scenario(spool_dir):
        clock = FakeClock()
        sink = SinkDownAfter()
        buffer = new_buffer(sink, spool_dir, clock, capacity_events=capacity, batch_events=batch,
                            spill_chunk_events=chunk, segment_events=segment)
        recorded = 0
        for action, value in steps:
            if action == "record":
                for n in range(recorded, recorded + value):
                    buffer.record(event(n))
                recorded += value
            elif action == "sink":                  # up for `value` more batches (None: for good)
                sink.down, sink.good_batches = False, value
            elif action == "commit":
                buffer.commit()
            else:
                clock.advance(value)
                await buffer.flush_due()
            assert sink.ids == ids(range(len(sink.ids)))     # a prefix, in order, no repeats
            assert buffer.recorded_total == (buffer.flushed_total + buffer.depth
                                             + buffer.spooled_events + buffer.lost_total)
            assert buffer.depth <= capacity + chunk          # memory, and overflow waiting for its chunk
        sink.down, sink.good_batches = False, None
        await buffer.close(timeout_s=10.0)
        assert sink.ids == ids(range(recorded))
        assert buffer.lost_total == 0
        assert spool_files(spool_dir) == []

    with tempfile.TemporaryDirectory() as spool_dir:
        asyncio.run(scenario(spool_dir))


def test_file_sink_output_parses_back_into_the_same_events(tmp_path):
    path = tmp_path / "meter" / "2024" / "events.ndjson"   # parent directories are created
    batches = [[event(n) for n in range(0, 3)], [event(n) for n in range(3, 10)]]

    async def scenario():
        sink = NdjsonFileSink(path)
        for batch in batches:
            await sink.write_batch(batch)
        await sink.write_batch([])
        await sink.close()
        with pytest.raises(RuntimeError):
            await sink.write_batch(batches[0])

    asyncio.run(scenario())
    data = path.read_bytes()
    assert data.count(b"\n") == 10
    assert decode_ndjson(data) == ([event(n) for n in range(10)], 0)
    assert set(json.loads(data.splitlines()[0])) == {
        "id", "customer_id", "metric", "quantity", "timestamp", "route", "status",
        "request_bytes", "response_bytes", "latency_ms", "dimensions"}


def test_an_events_dimensions_go_with_it_and_older_lines_read_as_none():
    from proxy.control_plane_link import usage_ndjson
    from proxy.meter_event import decode_event, encode_ndjson

    priced = MeterEvent("e" * 32, "cus_1", "ai_output_tokens", 812, 1_800_000_000.0, "chat", 200, 10, 20, 1.5,
                        {"model": "gpt-4o-mini"})
    assert decode_ndjson(encode_ndjson([priced])) == ([priced], 0)
    older = json.loads(encode_ndjson([priced]))
    del older["dimensions"]                         # a spool line from before dimensions
    assert decode_event(json.dumps(older).encode()).dimensions is None
    (wire,) = [json.loads(line) for line in usage_ndjson([priced]).splitlines()]
    assert wire["dimensions"] == {"model": "gpt-4o-mini", "route": "chat", "status": "200"}


def test_a_batch_larger_than_an_encoding_slice_lands_whole_and_in_order(tmp_path):
    # The file sink encodes a big batch in slices between requests; the file must
    # still hold the batch once, in order, with no slice lost or repeated.
    from proxy.metering import ENCODE_SLICE_EVENTS
    path = tmp_path / "events.ndjson"
    count = 3 * ENCODE_SLICE_EVENTS + 5
    batch = [event(n) for n in range(count)]

    async def scenario():
        sink = NdjsonFileSink(path)
        await sink.write_batch(batch)
        await sink.close()

    asyncio.run(scenario())
    assert decode_ndjson(path.read_bytes()) == (batch, 0)


def test_buffer_into_file_sink_end_to_end(tmp_path):
    async def scenario():
        sink = NdjsonFileSink(tmp_path / "events.ndjson")
        buffer = new_buffer(sink, tmp_path / "spool", FakeClock(), capacity_events=8, batch_events=4)
        for n in range(40):
            buffer.record(event(n))
        await buffer.close(timeout_s=5.0)
        await sink.close()

    asyncio.run(scenario())
    assert decode_ndjson((tmp_path / "events.ndjson").read_bytes()) == ([event(n) for n in range(40)], 0)


def test_event_ids_are_unique_32_hex_chars():
    generated = [new_event_id() for _ in range(100_000)]
    assert len(set(generated)) == 100_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", event_id) for event_id in generated[:1000] + generated[-1000:])
    assert {event_id[:16] for event_id in generated} == {process_id_prefix()}


def test_two_id_sources_have_different_prefixes_and_disjoint_ids():
    first, second = EventIds(), EventIds()
    assert first.prefix != second.prefix
    assert not {first.next() for _ in range(10_000)} & {second.next() for _ in range(10_000)}
    assert EventIds(prefix=0xAB).next() == "00000000000000ab" + "0" * 16
    with pytest.raises(ValueError):
        EventIds(prefix=1 << 64)


def test_another_process_draws_another_prefix():
    command = "from proxy.meter_event import new_event_id; print(new_event_id())"
    other = subprocess.run([sys.executable, "-c", command], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", other)
    assert other[:16] != process_id_prefix()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_its_own_prefix():
    new_event_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # child: report its next id and leave
        os.close(read_end)
        os.write(write_end, new_event_id().encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_id = pipe.read().decode()
    os.waitpid(pid, 0)
    assert child_id[:16] != process_id_prefix()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 12),
    chunk=st.integers(1, 6),
    steps=BUFFER_STEPS,
)
def test_a_crash_loses_nothing_recorded_before_the_last_group_commit(capacity, chunk, steps):
    # A worker dies (no close) at any point: the next buffer on its spool delivers every
    # event recorded before its last commit, oldest first (repeats allowed: ids dedupe).
    async def crashed_run(spool_dir):
        clock = FakeClock()
        sink = SinkDownAfter()
        buffer = new_buffer(sink, spool_dir, clock, capacity_events=capacity, batch_events=1,
                            spill_chunk_events=chunk, segment_events=5)
        recorded = committed = 0
        for action, value in steps:
            if action == "record":
                for n in range(recorded, recorded + value):
                    buffer.record(event(n))
                recorded += value
            elif action == "sink":
                sink.down, sink.good_batches = False, value
            elif action == "commit":
                buffer.commit()
                committed = recorded
            else:
                clock.advance(value)
                await buffer.flush_due()
        return sink.ids, committed

    async def next_run(spool_dir):
        clock = FakeClock()
        sink = RecordingSink()
        buffer = new_buffer(sink, spool_dir, clock)
        while await buffer.flush_due():
            clock.advance(1.0)
        await buffer.close(timeout_s=1.0)
        return sink.ids

    with tempfile.TemporaryDirectory() as spool_dir:
        before, committed = asyncio.run(crashed_run(spool_dir))
        after = asyncio.run(next_run(spool_dir))
        assert set(ids(range(committed))) <= set(before) | set(after)
        assert after == sorted(after) and len(set(after)) == len(after)   # oldest first, once each
        assert spool_files(spool_dir) == []


def test_a_crashed_buffers_journal_is_replayed_before_its_spool(tmp_path):
    async def crashed_run():
        sink = RecordingSink()
        sink.down = True
        buffer = new_buffer(sink, tmp_path, FakeClock(), capacity_events=10, spill_chunk_events=4)
        for n in range(30):
            buffer.record(event(n))
        buffer.commit()
        assert (buffer.depth, buffer.spooled_events) == (10, 20)
        assert spool_files(tmp_path) and any(name.startswith("journal/") for name in spool_files(tmp_path))

    async def next_run():
        sink = RecordingSink()
        buffer = new_buffer(sink, tmp_path, FakeClock())
        assert buffer.spooled_events == 30          # the journal's 10 and the spool's 20
        await buffer.flush_due()
        await buffer.close(timeout_s=1.0)
        return sink.ids

    asyncio.run(crashed_run())
    assert asyncio.run(next_run()) == ids(range(30))
    assert spool_files(tmp_path) == []
