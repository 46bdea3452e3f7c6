cimport cython

@cython.final
cdef class LevelThresholds:
    cdef readonly double level_1
    cdef readonly double level_2
    cdef readonly double level_3
    cdef readonly double band

    cpdef double threshold(self, int level)


cpdef double margin_pct(double revenue, double cogs)

cpdef int margin_level(double margin, LevelThresholds thresholds, int current)
