cpdef _check_units(units)

cdef class PerUnit:
    cdef readonly object price_nanos
    cdef readonly object per_units
    cpdef revenue(self, units)


cdef class Tier:
    cdef readonly object up_to
    cdef readonly object price_nanos
    cdef readonly object per_units
    cdef readonly object flat_nanos
    cpdef charge(self, units)


cdef class Graduated:
    cdef readonly tuple tiers
    cpdef revenue(self, units)


cdef class Volume:
    cdef readonly tuple tiers
    cpdef revenue(self, units)


cdef class Package:
    cdef readonly object package_size
    cdef readonly object price_nanos
    cpdef revenue(self, units)


cdef class FlatFee:
    cdef readonly object amount_nanos
    cpdef revenue(self, units)


cpdef event_revenue(model, units_before, units)
