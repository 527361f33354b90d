/*
 * quelay_native.h -- the hot path of quelay in plain C99.
 *
 * Two independent pieces, both free of global state and of Python.h:
 *
 *   qn_spool  a byte ring buffer addressed by absolute 64-bit offsets
 *             A (acked) <= Q (queued: next byte to hand to QUIC) <= T (tail:
 *             next byte the local client writes), with T - A <= capacity.
 *             Its memory follows the bytes it holds, not its capacity: the
 *             ring grows on demand and shrinks as acks drain it.
 *
 *   qn_drr    deficit-round-robin accounting for the stream scheduler:
 *             control streams first by strict priority, bulk streams share
 *             the rest in proportion to (priority + 1); a new stream's first
 *             activation is served next (see drr.c).
 *
 * Every function that can fail returns a status code (QN_OK or a negative
 * QN_E* value).  Functions that return a byte count return it as a
 * non-negative int64_t and report failures as a negative QN_E* value.
 * Every allocation is checked; on failure the object is left unchanged
 * (a spool write may still take what fits in the ring it has).
 *
 * Callers (the cffi wrapper in quelay/native/_cffi_backend.py) validate
 * arguments first; the checks here are a second line of defence, never the
 * only one.
 */
#ifndef QUELAY_NATIVE_H
#define QUELAY_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* ---- status codes ---------------------------------------------------- */

#define QN_OK 0
#define QN_ENOMEM (-1)    /* an allocation failed; nothing was changed      */
#define QN_EINVAL (-2)    /* NULL object, zero/oversized size, bad priority */
#define QN_ECLOSED (-3)   /* write to a closed spool                        */
#define QN_ERANGE (-4)    /* offset or count beyond the tail                */
#define QN_EEXIST (-5)    /* stream id already in the table                 */
#define QN_ENOENT (-6)    /* stream id not in the table                     */
#define QN_EOVERFLOW (-7) /* a 64-bit offset or a table size would wrap     */
#define QN_ERELEASED (-8) /* the spool was released (qn_spool_fini)      */

/* ---- spool ----------------------------------------------------------- */

/* Largest capacity a spool accepts (1 TiB); also bounded by SIZE_MAX. */
#define QN_SPOOL_MAX_CAPACITY ((uint64_t)1 << 40)
/* Smallest ring a spool allocates: sizes are QN_SPOOL_MIN_RING << k, capped
 * at the capacity. */
#define QN_SPOOL_MIN_RING ((uint64_t)4096)

/*
 * Memory follows the bytes held (T - A), not the capacity:
 *
 *   - a new spool holds no ring (size 0): an idle stream costs nothing;
 *   - a write that needs more room moves the bytes A..T into a ring of
 *     size(T - A + n) = the smallest QN_SPOOL_MIN_RING << k that holds
 *     them, capped at the capacity (so growth doubles, amortised O(1));
 *   - an ack that drains the spool (A == T) frees the ring; one that leaves
 *     less than a quarter of it in use moves the bytes into size(2 (T - A)).
 *
 * Every move is counted in `moves`.  If the allocation fails the spool keeps
 * its ring: a write then takes what fits in it (back-pressure; QN_ENOMEM
 * only if nothing does), a shrink simply does not happen.  Nothing is lost.
 *
 * Ring ownership: the spool frees each ring it stops using, unless the
 * caller took it with qn_spool_lend() (to keep pointers into it, like the
 * Python wrapper's zero-copy views).  A lent ring is still used until the
 * next move and is then only forgotten; the caller frees it with
 * qn_spool_free_ring() once its pointers are gone.
 *
 * The struct is public so that a caller can embed it (the Python wrapper
 * allocates it) and read the offsets without a function call.  Only the
 * qn_spool_* functions may modify it.
 */
typedef struct qn_spool {
    uint8_t *buf;      /* ring of `size` bytes; NULL while size is 0     */
    uint64_t size;     /* bytes allocated for the ring (0 when empty)    */
    uint64_t capacity; /* the cap on T - A                               */
    uint64_t acked;    /* A: every byte below A is safe at the far side */
    uint64_t queued;   /* Q: next byte to hand to the transport         */
    uint64_t tail;     /* T: next byte the client writes                */
    uint64_t moves;    /* times the ring was replaced (grown, shrunk)   */
    int closed;        /* 1 once the client signalled EOF at T          */
    int released;      /* 1 after qn_spool_fini                         */
    int lent;          /* 1 if the caller owns the current ring         */
} qn_spool;

/* Set up an empty spool (no ring yet).  QN_EINVAL for a zero or oversized
 * capacity (then `s` is zeroed and marked released). */
int qn_spool_init(qn_spool *s, uint64_t capacity);

/* Free the ring (unless lent); every later call returns QN_ERELEASED.
 * Offsets stay readable.  Safe to call twice, or on NULL. */
void qn_spool_fini(qn_spool *s);

/* Give the caller ownership of the current ring (see above) and return it;
 * NULL if there is none.  Call it once per ring: `moves` tells when the
 * ring changed. */
uint8_t *qn_spool_lend(qn_spool *s);

/* Free a ring taken with qn_spool_lend().  NULL is ignored. */
void qn_spool_free_ring(uint8_t *ring);

/* Copy min(len, capacity - (T - A)) bytes at T, growing the ring as needed,
 * and advance T.  Returns the count (0 when full, fewer if the ring could not
 * grow), QN_ENOMEM if the ring could not grow and nothing fits, QN_ECLOSED
 * after close, QN_EOVERFLOW if T would wrap. */
int64_t qn_spool_write(qn_spool *s, const char *data, size_t len);

/* Copy min(len, T - Q) bytes from Q into dst (across the ring's end) and
 * advance Q.  Returns the count. */
int64_t qn_spool_read(qn_spool *s, char *dst, size_t len);

/* Length of the contiguous run of pending bytes starting at Q, at most
 * `max`; *ring_offset receives the run's index in buf.  No state change. */
int64_t qn_spool_peek(const qn_spool *s, uint64_t max, uint64_t *ring_offset);

/* Q += n; QN_ERANGE (and no change) if that would pass T. */
int qn_spool_advance(qn_spool *s, uint64_t n);

/* The receiver holds everything below `offset`.  Below A: ignored.
 * Above T: QN_ERANGE.  Otherwise A = offset, Q = max(Q, A), and the ring
 * shrinks (or is freed) as described above. */
int qn_spool_ack(qn_spool *s, uint64_t offset);

/* Link lost: Q = A, everything unacknowledged will be handed out again. */
int qn_spool_rewind(qn_spool *s);

/* EOF at T.  Idempotent. */
int qn_spool_close(qn_spool *s);

/* ---- deficit round robin --------------------------------------------- */

#define QN_DRR_PRIORITY_MIN 0
#define QN_DRR_PRIORITY_MAX 15
/* Bounds that keep every sum of quanta inside 64 bits. */
#define QN_DRR_MAX_BASE_QUANTUM ((uint64_t)1 << 30)
#define QN_DRR_MAX_STREAMS ((uint32_t)1 << 26)
/* Backlogs and budgets are byte counts below 2^63. */
#define QN_DRR_MAX_BYTES ((uint64_t)INT64_MAX)

typedef struct qn_drr qn_drr; /* opaque */

typedef struct qn_drr_stream_info {
    uint64_t backlog; /* bytes ready to send, as last told minus grants  */
    uint64_t deficit; /* unused credit of an interrupted visit (bulk)    */
    uint64_t quantum; /* base_quantum * (priority + 1)                   */
    int priority;
    int control;
} qn_drr_stream_info;

int qn_drr_create(uint64_t base_quantum, qn_drr **out);
void qn_drr_destroy(qn_drr *d);

int qn_drr_add(qn_drr *d, uint64_t id, int priority, int control);
int qn_drr_remove(qn_drr *d, uint64_t id);
int qn_drr_set_priority(qn_drr *d, uint64_t id, int priority);
int qn_drr_set_backlog(qn_drr *d, uint64_t id, uint64_t backlog);
/* New base quantum for every stream (quantum = base * (priority + 1)); an
 * unfinished visit keeps the credit it has.  QN_EINVAL if 0 or too large. */
int qn_drr_set_base_quantum(qn_drr *d, uint64_t base_quantum);
uint64_t qn_drr_base_quantum(const qn_drr *d);
/* Bulk streams with backlog > 0 (the active ring). */
uint64_t qn_drr_active(const qn_drr *d);
int qn_drr_info(const qn_drr *d, uint64_t id, qn_drr_stream_info *out);
/* 1 if present, 0 if not (or d is NULL). */
int qn_drr_contains(const qn_drr *d, uint64_t id);
uint64_t qn_drr_count(const qn_drr *d);

/*
 * Hand out at most `budget` bytes.  Returns the number of grants n and sets
 * *grants to an array of 2n uint64_t: (stream id, bytes) pairs, at most one
 * pair per stream, control streams first, then bulk streams in the order
 * they were first served.  The array belongs to `d` and stays valid until
 * the next call that changes `d`.
 */
int64_t qn_drr_schedule(qn_drr *d, uint64_t budget, const uint64_t **grants);

#endif /* QUELAY_NATIVE_H */
