# C types for proxy/llm_usage.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1). Only the response reader, which sees every chunk of an
# LLM answer, needs them; the msgspec structs stay Python classes.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING


cdef extern from "<string.h>":
    # GNU extensions (Python.h defines _GNU_SOURCE before any system header).
    const void* memmem(const void* haystack, size_t haystack_size, const void* needle, size_t needle_size)
    const void* memchr(const void* data, int byte, size_t size)
    const void* memrchr(const void* data, int byte, size_t size)


cdef tuple _CHAT_MARKERS, _RESPONSES_MARKERS, _ANTHROPIC_MARKERS

@cython.locals(size=Py_ssize_t, data=cython.p_char, found=cython.p_void)
cdef Py_ssize_t _find(bytes chunk, bytes marker, Py_ssize_t at, Py_ssize_t end) except? -2

@cython.locals(data=cython.p_char, found=cython.p_void)
cdef Py_ssize_t _event_end(bytes chunk, Py_ssize_t at, Py_ssize_t end) except -1

@cython.locals(lf=Py_ssize_t, crlf=Py_ssize_t, last=Py_ssize_t, data=cython.p_char, found=cython.p_void)
cdef Py_ssize_t _last_event_end(bytes chunk, Py_ssize_t at, Py_ssize_t end) except -1


@cython.final
cdef class UsageReader:
    cdef readonly object _format
    cdef readonly bint _sse
    cdef readonly set _flags
    cdef readonly list _parts
    cdef readonly Py_ssize_t _kept
    cdef readonly list _line
    cdef readonly Py_ssize_t _line_bytes
    cdef readonly bytes _event
    cdef readonly list _data
    cdef readonly Py_ssize_t _data_bytes
    cdef readonly object _model
    cdef readonly bint _done
    cdef readonly dict _usage
    cdef readonly bint _dropped
    cdef readonly object _finished

    cpdef feed(self, chunk)
    cdef _feed_json(self, bytes chunk)
    @cython.locals(at=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, first=Py_ssize_t, found=Py_ssize_t,
                   skip=Py_ssize_t, markers=tuple)
    cdef _feed_sse(self, bytes chunk)
    cdef tuple _markers(self)
    @cython.locals(newline=Py_ssize_t, line=bytes)
    cdef _feed_lines(self, bytes chunk, Py_ssize_t at, Py_ssize_t end)
    cdef _sse_line(self, bytes line)
    @cython.locals(data=list, event=bytes, payload=bytes)
    cdef _dispatch(self)
    cdef _chat_event(self, bytes payload)
    cdef _responses_event(self, bytes event, bytes payload)
    cdef _anthropic_event(self, bytes event, bytes payload)
    cdef _decode(self, decoder, bytes payload)
    cdef _set_model(self, model)
    cdef _count(self, str field, value)
    cdef _read_chat(self, body)
    cdef _read_response(self, response)
    cdef _read_openai_usage(self, input_tokens, output_tokens, input_details, output_details)
    cdef _read_anthropic(self, message)
    cdef _read_anthropic_usage(self, usage)
    cpdef finish(self)
    cdef _finish_reading(self)
    cdef _usage_so_far(self)
