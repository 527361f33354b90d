/*
 * spool.c -- the per-stream ring buffer (see quelay_native.h).
 *
 * Offsets are absolute and only grow; a byte at offset X lives at
 * buf[X % size].  Invariants kept by every function:
 *     acked <= queued <= tail,   tail - acked <= size <= capacity,
 *     size == 0 or size == min(capacity, QN_SPOOL_MIN_RING << k),
 *     buf == NULL exactly when size == 0.
 * The ring is replaced (moved) only by a write that needs more room and by
 * an ack that leaves it mostly empty; a move copies the bytes A..T, each to
 * its offset modulo the new size.
 */
#include <stdlib.h>
#include <string.h>

#include "quelay_native.h"

/* The allocator of rings; a test build defines its own to make it fail. */
#ifndef QN_MALLOC
#define QN_MALLOC malloc
#endif
#ifndef QN_FREE
#define QN_FREE free
#endif

int qn_spool_init(qn_spool *s, uint64_t capacity)
{
    if (s == NULL)
        return QN_EINVAL;
    memset(s, 0, sizeof *s);
    if (capacity == 0 || capacity > QN_SPOOL_MAX_CAPACITY || capacity > (uint64_t)SIZE_MAX) {
        s->released = 1;
        return QN_EINVAL;
    }
    s->capacity = capacity;
    return QN_OK;
}

void qn_spool_fini(qn_spool *s)
{
    if (s == NULL)
        return;
    if (!s->lent)
        QN_FREE(s->buf);
    s->buf = NULL;
    s->size = 0;
    s->lent = 0;
    s->released = 1;
}

uint8_t *qn_spool_lend(qn_spool *s)
{
    if (s == NULL || s->released || s->buf == NULL)
        return NULL;
    s->lent = 1;
    return s->buf;
}

void qn_spool_free_ring(uint8_t *ring)
{
    QN_FREE(ring);
}

/* The ring size that holds `need` bytes: 0, or QN_SPOOL_MIN_RING << k capped
 * at the capacity.  need <= capacity <= 2^40, so the doubling cannot wrap. */
static uint64_t ring_size_for(const qn_spool *s, uint64_t need)
{
    uint64_t size = QN_SPOOL_MIN_RING;
    if (need == 0)
        return 0;
    while (size < need && size < s->capacity)
        size <<= 1;
    return size < s->capacity ? size : s->capacity;
}

/* Copy n bytes into a ring of `size` bytes at absolute offset `at` (wrapping). */
static void ring_put(uint8_t *buf, uint64_t size, uint64_t at, const uint8_t *src, size_t n)
{
    size_t idx = (size_t)(at % size);
    size_t first = (size_t)size - idx;
    if (first > n)
        first = n;
    memcpy(buf + idx, src, first);
    if (n > first)
        memcpy(buf, src + first, n - first);
}

/* Copy n bytes out of the ring starting at absolute offset `at`. */
static void ring_get(const qn_spool *s, uint64_t at, uint8_t *dst, size_t n)
{
    size_t idx = (size_t)(at % s->size);
    size_t first = (size_t)s->size - idx;
    if (first > n)
        first = n;
    memcpy(dst, s->buf + idx, first);
    if (n > first)
        memcpy(dst + first, s->buf, n - first);
}

/* Replace the ring by one of `size` bytes (>= T - A) holding the bytes A..T.
 * QN_ENOMEM, and no change, if it cannot be allocated. */
static int move_ring(qn_spool *s, uint64_t size)
{
    uint8_t *ring = NULL;
    if (size > 0) {
        uint64_t at = s->acked;
        ring = (uint8_t *)QN_MALLOC((size_t)size);
        if (ring == NULL)
            return QN_ENOMEM;
        while (at < s->tail) { /* at most two runs: the old ring may wrap */
            uint64_t idx = at % s->size;
            uint64_t run = s->size - idx;
            if (run > s->tail - at)
                run = s->tail - at;
            ring_put(ring, size, at, s->buf + idx, (size_t)run);
            at += run;
        }
    }
    if (!s->lent)
        QN_FREE(s->buf);
    s->buf = ring;
    s->size = size;
    s->lent = 0;
    s->moves++;
    return QN_OK;
}

int64_t qn_spool_write(qn_spool *s, const char *data, size_t len)
{
    uint64_t n, held;
    if (s == NULL)
        return QN_EINVAL;
    if (s->released)
        return QN_ERELEASED;
    if (s->closed)
        return QN_ECLOSED;
    held = s->tail - s->acked;
    n = s->capacity - held;
    if ((uint64_t)len < n)
        n = (uint64_t)len;
    if (n == 0)
        return 0;
    if (data == NULL)
        return QN_EINVAL;
    if (s->tail > UINT64_MAX - n)
        return QN_EOVERFLOW;
    if (held + n > s->size && move_ring(s, ring_size_for(s, held + n)) != QN_OK) {
        /* No memory for a bigger ring: take what fits in this one. */
        if (s->size - held == 0)
            return QN_ENOMEM;
        if (s->size - held < n)
            n = s->size - held;
    }
    ring_put(s->buf, s->size, s->tail, (const uint8_t *)data, (size_t)n);
    s->tail += n;
    return (int64_t)n; /* n <= capacity <= 2^40 */
}

int64_t qn_spool_read(qn_spool *s, char *dst, size_t len)
{
    uint64_t n;
    if (s == NULL)
        return QN_EINVAL;
    if (s->released)
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
    if (s->released)
        return QN_ERELEASED;
    *ring_offset = 0;
    if (s->size == 0)
        return 0; /* no ring: nothing is held, so nothing is pending */
    idx = s->queued % s->size;
    n = s->tail - s->queued;
    run = s->size - idx;
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
    if (s->released)
        return QN_ERELEASED;
    if (n > s->tail - s->queued)
        return QN_ERANGE;
    s->queued += n;
    return QN_OK;
}

int qn_spool_ack(qn_spool *s, uint64_t offset)
{
    uint64_t held, size;
    if (s == NULL)
        return QN_EINVAL;
    if (s->released)
        return QN_ERELEASED;
    if (offset > s->tail)
        return QN_ERANGE;
    if (offset <= s->acked)
        return QN_OK; /* stale or duplicate ack */
    s->acked = offset;
    if (s->queued < offset)
        s->queued = offset; /* an ack overtook a rewound Q */
    held = s->tail - s->acked;
    if (held < s->size / 4 || held == 0) {
        size = ring_size_for(s, 2 * held);
        if (size < s->size)
            (void)move_ring(s, size); /* no memory: keep the bigger ring */
    }
    return QN_OK;
}

int qn_spool_rewind(qn_spool *s)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->released)
        return QN_ERELEASED;
    s->queued = s->acked;
    return QN_OK;
}

int qn_spool_close(qn_spool *s)
{
    if (s == NULL)
        return QN_EINVAL;
    if (s->released)
        return QN_ERELEASED;
    s->closed = 1;
    return QN_OK;
}
