from decision_core.bucket cimport TokenBucket


cdef class GuardStanding:
    cdef readonly str guard_id
    cdef readonly int level
    cdef readonly bint enforce
    cdef readonly TokenBucket bucket
    cdef readonly frozenset locked_features
    cdef readonly str block_detail
    cdef readonly str throttle_detail


cdef class CustomerState:
    cdef readonly str customer_id
    cdef readonly str tier
    cdef readonly str subscription_status
    cdef readonly bint subscription_open
    cdef readonly frozenset features
    cdef readonly dict quotas
    cdef readonly dict guard_levels
    cdef readonly double period_end
    cdef readonly dict quota_index
    cdef readonly dict acting_levels


cdef class RequestFacts:
    cdef readonly tuple features
    cdef readonly str metric
    cdef readonly long long units
