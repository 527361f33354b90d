/*
 * drr.c -- deficit-round-robin accounting for the stream scheduler
 * (see quelay_native.h).
 *
 * Streams live in a slot array (freed slots are reused) and are found by id
 * through an open-addressing hash table (linear probing, load <= 1/2,
 * backward-shift deletion).  Two orders sit on top of the slots:
 *
 *   - control streams: an array of slots sorted by (priority desc, add
 *     order asc), served first with strict priority;
 *   - the active ring: bulk streams with backlog > 0, a circular doubly
 *     linked list in the order they became backlogged.  `head` is the
 *     stream being visited.  A stream whose deficit is > 0 is in the
 *     middle of a visit the budget cut short: when it is the head again it
 *     resumes without a new quantum.
 *
 * A visit adds the stream's quantum to its deficit and grants
 * min(deficit, backlog, remaining budget).  The visit ends when the
 * backlog is empty (the stream leaves the ring and forfeits its deficit)
 * or the deficit is spent (the ring turns); if the budget runs out first
 * the visit stays in progress for the next call.
 *
 * A new stream's first activation (the first backlog after qn_drr_add)
 * joins at the front of the ring, ahead of the head's unfinished visit,
 * which keeps its deficit and resumes right after: a new transfer gets its
 * first grant from the very next call, and costs everyone else at most one
 * of its quanta out of turn.  Every later activation joins at the tail.
 *
 * Whole rounds in which no stream can run dry are applied in one step
 * (fast_forward), so a huge budget costs O(streams^2) at worst instead of
 * O(budget / quantum); the result is identical to visiting one by one.
 */
#include <stdlib.h>
#include <string.h>

#include "quelay_native.h"

#define NIL UINT32_MAX
#define INITIAL_SLOTS 8u

typedef struct entry {
    uint64_t id;
    uint64_t backlog;
    uint64_t deficit;
    uint64_t quantum;
    uint64_t seq;      /* add order: tie-break among control streams     */
    uint32_t prev;     /* active ring links (bulk streams with backlog)  */
    uint32_t next;     /* ... and the free-list link of an unused slot   */
    uint32_t out_idx;  /* index of this stream's pair in `grants`        */
    uint32_t out_gen;  /* out_idx is valid when out_gen == d->gen        */
    uint8_t priority;
    uint8_t control;
    uint8_t active;
    uint8_t used;
    uint8_t fresh;     /* never backlogged yet: first activation at the front */
} entry;

struct qn_drr {
    uint64_t base_quantum;
    entry *e;           /* `cap` slots, `nslots` of them ever handed out */
    uint32_t cap;
    uint32_t nslots;
    uint32_t count;     /* live streams                                  */
    uint32_t free_head; /* first reusable slot or NIL                    */
    uint32_t *table;    /* slot + 1, 0 = empty; table_mask + 1 buckets   */
    uint32_t table_mask;
    uint32_t *ctrl;     /* control slots, (priority desc, seq asc)       */
    uint32_t nctrl;
    uint32_t head;      /* active ring head or NIL                       */
    uint32_t nactive;
    uint64_t qsum;      /* sum of the quanta of the active ring          */
    uint64_t next_seq;
    uint32_t gen;       /* schedule() generation, for merging grants     */
    uint64_t *grants;   /* 2 * cap: (id, bytes) pairs of the last call   */
};

static uint32_t hash_id(uint64_t x)
{
    /* splitmix64 finaliser: ids are often small and sequential */
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return (uint32_t)x;
}

/* Slot of `id` or NIL; *pos receives its bucket (or the empty bucket where
 * it would go). */
static uint32_t find(const qn_drr *d, uint64_t id, uint32_t *pos)
{
    uint32_t i = hash_id(id) & d->table_mask;
    for (;;) {
        uint32_t v = d->table[i];
        if (v == 0 || d->e[v - 1].id == id) {
            if (pos != NULL)
                *pos = i;
            return v == 0 ? NIL : v - 1;
        }
        i = (i + 1) & d->table_mask;
    }
}

static void table_delete(qn_drr *d, uint32_t i)
{
    uint32_t mask = d->table_mask;
    uint32_t j = i;
    d->table[i] = 0;
    for (;;) {
        uint32_t v, k;
        j = (j + 1) & mask;
        v = d->table[j];
        if (v == 0)
            return;
        k = hash_id(d->e[v - 1].id) & mask;
        /* v stays unless its home bucket k lies cyclically outside (i, j] */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        d->table[i] = v;
        d->table[j] = 0;
        i = j;
    }
}

/* n elements of `size` bytes are addressable (matters where size_t is 32-bit) */
static int fits(uint64_t n, size_t size)
{
    return n <= (uint64_t)(SIZE_MAX / size);
}

/* Double the slot capacity (all arrays, then a rebuilt hash table).  On
 * failure nothing observable changes. */
static int grow(qn_drr *d)
{
    uint32_t newcap, tsize, mask, s;
    uint32_t *table, *ctrl;
    uint64_t *grants;
    entry *e;

    if (d->cap >= QN_DRR_MAX_STREAMS)
        return QN_EOVERFLOW;
    newcap = d->cap ? d->cap * 2u : INITIAL_SLOTS;
    if (newcap > QN_DRR_MAX_STREAMS)
        newcap = QN_DRR_MAX_STREAMS;
    tsize = newcap * 2u;
    if (!fits(newcap, sizeof(entry)) || !fits(newcap, 2 * sizeof(uint64_t)) ||
        !fits(tsize, sizeof(uint32_t)))
        return QN_ENOMEM;

    table = (uint32_t *)calloc(tsize, sizeof(uint32_t));
    if (table == NULL)
        return QN_ENOMEM;
    /* A successful realloc only makes an array larger than `cap` says,
     * which is harmless if a later step fails. */
    e = (entry *)realloc(d->e, (size_t)newcap * sizeof(entry));
    if (e == NULL) {
        free(table);
        return QN_ENOMEM;
    }
    d->e = e;
    ctrl = (uint32_t *)realloc(d->ctrl, (size_t)newcap * sizeof(uint32_t));
    if (ctrl == NULL) {
        free(table);
        return QN_ENOMEM;
    }
    d->ctrl = ctrl;
    grants = (uint64_t *)realloc(d->grants, (size_t)newcap * 2 * sizeof(uint64_t));
    if (grants == NULL) {
        free(table);
        return QN_ENOMEM;
    }
    d->grants = grants;

    mask = tsize - 1;
    for (s = 0; s < d->nslots; s++) {
        uint32_t i;
        if (!e[s].used)
            continue;
        i = hash_id(e[s].id) & mask;
        while (table[i] != 0)
            i = (i + 1) & mask;
        table[i] = s + 1;
    }
    free(d->table);
    d->table = table;
    d->table_mask = mask;
    d->cap = newcap;
    return QN_OK;
}

/* ---- active ring ------------------------------------------------------ */

/* Join at the tail (served after every stream already waiting), or, on a
 * stream's first activation, at the front (served next). */
static void active_push(qn_drr *d, uint32_t s)
{
    entry *e = d->e;
    if (d->head == NIL) {
        d->head = s;
        e[s].prev = e[s].next = s;
    } else {
        uint32_t h = d->head, t = e[h].prev;
        e[t].next = s;
        e[s].prev = t;
        e[s].next = h;
        e[h].prev = s;
        if (e[s].fresh)
            d->head = s;
    }
    e[s].fresh = 0;
    e[s].active = 1;
    e[s].deficit = 0;
    d->nactive++;
    d->qsum += e[s].quantum;
}

/* Leave the ring; an idle stream forfeits its deficit. */
static void active_unlink(qn_drr *d, uint32_t s)
{
    entry *e = d->e;
    if (e[s].next == s) {
        d->head = NIL;
    } else {
        e[e[s].prev].next = e[s].next;
        e[e[s].next].prev = e[s].prev;
        if (d->head == s)
            d->head = e[s].next;
    }
    e[s].active = 0;
    e[s].deficit = 0;
    d->nactive--;
    d->qsum -= e[s].quantum;
}

/* ---- control order ---------------------------------------------------- */

static void ctrl_insert(qn_drr *d, uint32_t s)
{
    const entry *e = d->e;
    uint32_t i = 0, n = d->nctrl;
    while (i < n) {
        const entry *c = &e[d->ctrl[i]];
        if (c->priority < e[s].priority ||
            (c->priority == e[s].priority && c->seq > e[s].seq))
            break;
        i++;
    }
    memmove(&d->ctrl[i + 1], &d->ctrl[i], (size_t)(n - i) * sizeof(uint32_t));
    d->ctrl[i] = s;
    d->nctrl++;
}

static void ctrl_remove(qn_drr *d, uint32_t s)
{
    uint32_t i = 0, n = d->nctrl;
    while (i < n && d->ctrl[i] != s)
        i++;
    if (i == n)
        return;
    memmove(&d->ctrl[i], &d->ctrl[i + 1], (size_t)(n - i - 1) * sizeof(uint32_t));
    d->nctrl--;
}

/* ---- public API --------------------------------------------------------- */

int qn_drr_create(uint64_t base_quantum, qn_drr **out)
{
    qn_drr *d;
    int rc;
    if (out == NULL)
        return QN_EINVAL;
    *out = NULL;
    if (base_quantum == 0 || base_quantum > QN_DRR_MAX_BASE_QUANTUM)
        return QN_EINVAL;
    d = (qn_drr *)calloc(1, sizeof *d);
    if (d == NULL)
        return QN_ENOMEM;
    d->base_quantum = base_quantum;
    d->head = NIL;
    d->free_head = NIL;
    rc = grow(d);
    if (rc != QN_OK) {
        qn_drr_destroy(d);
        return rc;
    }
    *out = d;
    return QN_OK;
}

void qn_drr_destroy(qn_drr *d)
{
    if (d == NULL)
        return;
    free(d->e);
    free(d->table);
    free(d->ctrl);
    free(d->grants);
    free(d);
}

static int valid_priority(int priority)
{
    return priority >= QN_DRR_PRIORITY_MIN && priority <= QN_DRR_PRIORITY_MAX;
}

int qn_drr_add(qn_drr *d, uint64_t id, int priority, int control)
{
    uint32_t s, pos;
    entry *e;
    if (d == NULL || !valid_priority(priority))
        return QN_EINVAL;
    if (find(d, id, NULL) != NIL)
        return QN_EEXIST;
    if (d->count >= QN_DRR_MAX_STREAMS)
        return QN_EOVERFLOW;
    if (d->free_head == NIL && d->nslots == d->cap) {
        int rc = grow(d);
        if (rc != QN_OK)
            return rc;
    }
    if (d->free_head != NIL) {
        s = d->free_head;
        d->free_head = d->e[s].next;
    } else {
        s = d->nslots++;
    }
    e = &d->e[s];
    memset(e, 0, sizeof *e);
    e->id = id;
    e->priority = (uint8_t)priority;
    e->control = control ? 1 : 0;
    e->quantum = d->base_quantum * (uint64_t)(priority + 1);
    e->seq = d->next_seq++;
    e->prev = e->next = NIL;
    e->used = 1;
    e->fresh = control ? 0 : 1;
    (void)find(d, id, &pos); /* the table may have been rebuilt by grow() */
    d->table[pos] = s + 1;
    if (e->control)
        ctrl_insert(d, s);
    d->count++;
    return QN_OK;
}

int qn_drr_remove(qn_drr *d, uint64_t id)
{
    uint32_t s, pos;
    if (d == NULL)
        return QN_EINVAL;
    s = find(d, id, &pos);
    if (s == NIL)
        return QN_ENOENT;
    if (d->e[s].active)
        active_unlink(d, s);
    if (d->e[s].control)
        ctrl_remove(d, s);
    table_delete(d, pos);
    d->e[s].used = 0;
    d->e[s].next = d->free_head;
    d->free_head = s;
    d->count--;
    return QN_OK;
}

int qn_drr_set_priority(qn_drr *d, uint64_t id, int priority)
{
    uint32_t s;
    entry *e;
    if (d == NULL || !valid_priority(priority))
        return QN_EINVAL;
    s = find(d, id, NULL);
    if (s == NIL)
        return QN_ENOENT;
    e = &d->e[s];
    if (e->active)
        d->qsum -= e->quantum;
    if (e->control)
        ctrl_remove(d, s);
    e->priority = (uint8_t)priority;
    e->quantum = d->base_quantum * (uint64_t)(priority + 1);
    if (e->control)
        ctrl_insert(d, s);
    if (e->active)
        d->qsum += e->quantum;
    return QN_OK;
}

int qn_drr_set_base_quantum(qn_drr *d, uint64_t base_quantum)
{
    uint32_t i;
    if (d == NULL || base_quantum == 0 || base_quantum > QN_DRR_MAX_BASE_QUANTUM)
        return QN_EINVAL;
    d->base_quantum = base_quantum;
    d->qsum = 0;
    for (i = 0; i < d->nslots; i++) {
        entry *e = &d->e[i];
        if (!e->used)
            continue;
        e->quantum = base_quantum * (uint64_t)(e->priority + 1);
        if (e->active)
            d->qsum += e->quantum;
    }
    return QN_OK;
}

uint64_t qn_drr_base_quantum(const qn_drr *d)
{
    return d == NULL ? 0 : d->base_quantum;
}

uint64_t qn_drr_active(const qn_drr *d)
{
    return d == NULL ? 0 : d->nactive;
}

int qn_drr_set_backlog(qn_drr *d, uint64_t id, uint64_t backlog)
{
    uint32_t s;
    entry *e;
    if (d == NULL || backlog > QN_DRR_MAX_BYTES)
        return QN_EINVAL;
    s = find(d, id, NULL);
    if (s == NIL)
        return QN_ENOENT;
    e = &d->e[s];
    e->backlog = backlog;
    if (!e->control) {
        if (backlog > 0 && !e->active)
            active_push(d, s);
        else if (backlog == 0 && e->active)
            active_unlink(d, s);
    }
    return QN_OK;
}

int qn_drr_info(const qn_drr *d, uint64_t id, qn_drr_stream_info *out)
{
    uint32_t s;
    const entry *e;
    if (d == NULL || out == NULL)
        return QN_EINVAL;
    s = find(d, id, NULL);
    if (s == NIL)
        return QN_ENOENT;
    e = &d->e[s];
    out->backlog = e->backlog;
    out->deficit = e->deficit;
    out->quantum = e->quantum;
    out->priority = e->priority;
    out->control = e->control;
    return QN_OK;
}

int qn_drr_contains(const qn_drr *d, uint64_t id)
{
    return d != NULL && find(d, id, NULL) != NIL;
}

uint64_t qn_drr_count(const qn_drr *d)
{
    return d == NULL ? 0 : d->count;
}

/* ---- scheduling --------------------------------------------------------- */

static void emit(qn_drr *d, entry *s, uint64_t g, uint32_t *ngr)
{
    if (s->out_gen == d->gen) {
        d->grants[2 * (size_t)s->out_idx + 1] += g;
    } else {
        s->out_gen = d->gen;
        s->out_idx = *ngr;
        d->grants[2 * (size_t)*ngr] = s->id;
        d->grants[2 * (size_t)*ngr + 1] = g;
        (*ngr)++;
    }
}

/*
 * At a round boundary (a new visit at the head, no stream holding the
 * credit of an unfinished visit): apply k whole rounds at once, where k
 * is the largest number of rounds the budget pays for in full and in which
 * no stream's backlog can reach zero.  In each such round every stream is
 * granted exactly its quantum and ends with a zero deficit, so the ring
 * comes back to the same head: the state after k single rounds.
 */
static void fast_forward(qn_drr *d, uint64_t *remaining, uint32_t *ngr)
{
    entry *e = d->e;
    uint32_t h = d->head, s = h;
    uint64_t k = *remaining / d->qsum;
    do {
        uint64_t r = (e[s].backlog - 1) / e[s].quantum;
        if (e[s].deficit != 0)
            return; /* a preempted visit resumes in this round: go one by one */
        if (r < k)
            k = r;
        s = e[s].next;
    } while (s != h && k > 0);
    if (k == 0)
        return;
    s = h;
    do {
        uint64_t g = k * e[s].quantum;
        e[s].backlog -= g;
        emit(d, &e[s], g, ngr);
        s = e[s].next;
    } while (s != h);
    *remaining -= k * d->qsum;
}

int64_t qn_drr_schedule(qn_drr *d, uint64_t budget, const uint64_t **grants)
{
    uint64_t remaining = budget;
    uint32_t ngr = 0, i, until_check = 0;
    entry *e;

    if (d == NULL || grants == NULL || budget > QN_DRR_MAX_BYTES)
        return QN_EINVAL;
    *grants = d->grants;
    e = d->e;
    if (++d->gen == 0) { /* wrapped: forget every stale out_gen */
        for (i = 0; i < d->nslots; i++)
            e[i].out_gen = 0;
        d->gen = 1;
    }

    /* control streams: strict priority, no deficit */
    for (i = 0; i < d->nctrl && remaining > 0; i++) {
        entry *s = &e[d->ctrl[i]];
        uint64_t g = s->backlog < remaining ? s->backlog : remaining;
        if (g == 0)
            continue;
        s->backlog -= g;
        remaining -= g;
        emit(d, s, g, &ngr);
    }

    /* bulk streams: deficit round robin over the active ring */
    while (remaining > 0 && d->head != NIL) {
        uint32_t h = d->head;
        entry *s = &e[h];
        uint64_t g;
        if (s->deficit == 0) { /* a new visit (else: resume an unfinished one) */
            /* at most one O(n) look-ahead per round of n visits */
            if (until_check == 0) {
                if (remaining >= d->qsum) {
                    fast_forward(d, &remaining, &ngr);
                    if (remaining == 0)
                        break;
                }
                until_check = d->nactive;
            }
            until_check--;
            s->deficit += s->quantum;
        }
        g = s->deficit;
        if (s->backlog < g)
            g = s->backlog;
        if (remaining < g)
            g = remaining;
        s->deficit -= g;
        s->backlog -= g;
        remaining -= g;
        emit(d, s, g, &ngr);
        if (s->backlog == 0) {
            active_unlink(d, h); /* also moves the head on */
        } else if (s->deficit == 0) {
            d->head = s->next;
        }
        /* else: budget exhausted mid-visit; resume here next call */
    }
    return (int64_t)ngr;
}
