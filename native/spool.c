/*
 * spool.c -- the per-stream ring buffer (see quelay_native.h).
 *
 * Offsets are absolute and only grow; a byte at offset X lives at
 * buf[X % capacity].  Invariants kept by every function:
 *     acked <= queued <= tail,   tail - acked <= capacity.
 */
#include <stdlib.h>
#include <string.h>

#include "quelay_native.h"

int qn_spool_init(qn_spool *s, uint64_t capacity)
{
    if (s == NULL)
        return QN_EINVAL;
    memset(s, 0, sizeof *s);
    if (capacity == 0 || capacity > QN_SPOOL_MAX_CAPACITY || capacity > (uint64_t)SIZE_MAX)
        return QN_EINVAL;
    s->buf = (uint8_t *)malloc((size_t)capacity);
    if (s->buf == NULL)
        return QN_ENOMEM;
    s->capacity = capacity;
    return QN_OK;
}

void qn_spool_fini(qn_spool *s)
{
    if (s == NULL)
        return;
    free(s->buf);
    s->buf = NULL;
}

/* Copy n bytes into the ring starting at absolute offset `at` (wrapping). */
static void ring_put(qn_spool *s, uint64_t at, const uint8_t *src, size_t n)
{
    size_t idx = (size_t)(at % s->capacity);
    size_t first = (size_t)s->capacity - idx;
    if (first > n)
        first = n;
    memcpy(s->buf + idx, src, first);
    if (n > first)
        memcpy(s->buf, src + first, n - first);
}

/* Copy n bytes out of the ring starting at absolute offset `at`. */
static void ring_get(const qn_spool *s, uint64_t at, uint8_t *dst, size_t n)
{
    size_t idx = (size_t)(at % s->capacity);
    size_t first = (size_t)s->capacity - idx;
    if (first > n)
        first = n;
    memcpy(dst, s->buf + idx, first);
    if (n > first)
        memcpy(dst + first, s->buf, n - first);
}

int64_t qn_spool_write(qn_spool *s, const char *data, size_t len)
{
    uint64_t n;
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    if (s->closed)
        return QN_ECLOSED;
    n = s->capacity - (s->tail - s->acked);
    if ((uint64_t)len < n)
        n = (uint64_t)len;
    if (n == 0)
        return 0;
    if (data == NULL)
        return QN_EINVAL;
    if (s->tail > UINT64_MAX - n)
        return QN_EOVERFLOW;
    ring_put(s, s->tail, (const uint8_t *)data, (size_t)n);
    s->tail += n;
    return (int64_t)n; /* n <= capacity <= 2^40 */
}

int64_t qn_spool_read(qn_spool *s, char *dst, size_t len)
{
    uint64_t n;
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    n = s->tail - s->queued;
    if ((uint64_t)len < n)
        n = (uint64_t)len;
    if (n == 0)
        return 0;
    if (dst == NULL)
        return QN_EINVAL;
    ring_get(s, s->queued, (uint8_t *)dst, (size_t)n);
    s->queued += n;
    return (int64_t)n;
}

int64_t qn_spool_peek(const qn_spool *s, uint64_t max, uint64_t *ring_offset)
{
    uint64_t idx, n, run;
    if (s == NULL || ring_offset == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    idx = s->queued % s->capacity;
    n = s->tail - s->queued;
    run = s->capacity - idx;
    if (run < n)
        n = run;
    if (max < n)
        n = max;
    *ring_offset = idx;
    return (int64_t)n;
}

int qn_spool_advance(qn_spool *s, uint64_t n)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    if (n > s->tail - s->queued)
        return QN_ERANGE;
    s->queued += n;
    return QN_OK;
}

int qn_spool_ack(qn_spool *s, uint64_t offset)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    if (offset > s->tail)
        return QN_ERANGE;
    if (offset <= s->acked)
        return QN_OK; /* stale or duplicate ack */
    s->acked = offset;
    if (s->queued < offset)
        s->queued = offset; /* an ack overtook a rewound Q */
    return QN_OK;
}

int qn_spool_rewind(qn_spool *s)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    s->queued = s->acked;
    return QN_OK;
}

int qn_spool_close(qn_spool *s)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->buf == NULL)
        return QN_ERELEASED;
    s->closed = 1;
    return QN_OK;
}
