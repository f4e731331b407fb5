/* api.c - version, status texts and the scale count: the entry points with no kernel behind them. */
#include "internal.h"

const char *cq_version(void) { return CQ_VERSION_STRING; }

const char *cq_strerror(int status)
{
    switch (status) {
    case CQ_OK: return "ok";
    case CQ_ERR_NULL: return "a required pointer is NULL";
    case CQ_ERR_SHAPE: return "invalid shape: sizes must be positive and agree";
    case CQ_ERR_GROUP: return "invalid group_size: it must be a positive multiple of 4 that divides k";
    case CQ_ERR_NONFINITE: return "NaN or Inf in a weight (or in cq_linear_ex's x_mul)";
    case CQ_ERR_OVERFLOW: return "size too large: a byte count or an int32 sum would overflow";
    case CQ_ERR_NOMEM: return "out of memory";
    case CQ_ERR_ISA: return "the requested instruction set is not available on this CPU or in this build";
    case CQ_ERR_RANGE: return "an int8 code is -128; codes must be in [-127, 127]";
    case CQ_ERR_ARG: return "invalid argument (unknown mode, scheme, ISA or thread count)";
    case CQ_ERR_VERSION: return "library and header versions differ";
    case CQ_ERR_FORMAT: return "not a packed weight for this shape and scale group (bad or mismatched header)";
    case CQ_ERR_ALIAS: return "an output buffer overlaps an input (in-place or partly shared buffers are not supported)";
    default: return "unknown status";
    }
}

int64_t cq_num_scales(int scheme, int64_t n, int64_t k, int64_t group_size)
{
    if (n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(n, k, 4)) return CQ_ERR_OVERFLOW;
    switch (scheme) {
    case CQ_PER_TENSOR: return 1;
    case CQ_PER_CHANNEL: return n;
    case CQ_PER_GROUP:
        if (group_size <= 0 || group_size % 4 != 0 || k % group_size != 0) return CQ_ERR_GROUP;
        return n * (k / group_size);
    default: return CQ_ERR_ARG;
    }
}

