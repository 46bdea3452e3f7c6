# C types for proxy/metering.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1). Only the buffer's request path needs them.
cimport cython


@cython.final
cdef class MeterBuffer:
    cdef object _sink
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _batch_events
    cdef double _flush_interval_s
    cdef Py_ssize_t _spill_chunk_events
    cdef double _retry_initial_s
    cdef double _retry_max_s
    cdef double _journal_interval_s
    cdef object _loop
    cdef object _clock
    cdef public long long recorded_total
    cdef public long long flushed_total
    cdef public long long spilled_total
    cdef public long long lost_total
    cdef public long long sink_errors_total
    cdef object _memory
    cdef list _spill_pending
    cdef object _spool
    cdef object _journal
    cdef list _unjournaled
    cdef long long _memory_out
    cdef double _last_commit
    cdef object _replay
    cdef bint _spilling
    cdef bint _closing
    cdef double _last_flush
    cdef double _retry_at
    cdef double _retry_s
    cdef object _wakeup
    cdef object _pass_lock
    cdef object _run_task

    @cython.locals(depth=Py_ssize_t)
    cpdef record(self, event)
