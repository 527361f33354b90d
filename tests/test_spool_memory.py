"""Spool memory follows the bytes held, not the capacity (both backends, counted).

The ring starts empty, grows on demand (SPOOL_MIN_RING << k, capped at the
capacity), shrinks when acks leave it mostly empty and is freed when they
drain it.  Out of memory, a write takes what fits.  The C side is also
driven directly, compiled with a counting allocator that can be told to
fail, and under AddressSanitizer where the compiler has it.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from quelay.native import _cffi_backend as cnative
from quelay.native import _model as pynative
from quelay.native.errors import SPOOL_MIN_RING, NativeMemoryError

BACKENDS = [pytest.param(cnative, id="c"), pytest.param(pynative, id="python")]
KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mod", BACKENDS)
def test_allocated_grows_with_writes_and_shrinks_with_acks(mod: Any) -> None:
    s = mod.Spool(1 * MiB)
    assert s.allocated == 0  # an open stream that wrote nothing holds no ring
    assert s.write(b"a" * 100) == 100
    assert s.allocated == SPOOL_MIN_RING == 4 * KiB
    assert s.write(b"b" * 5000) == 5000  # 5100 held: the next step
    assert s.allocated == 8 * KiB
    assert s.write(b"c" * 300_000) == 300_000  # 305100 held: straight to the size that fits
    assert s.allocated == 512 * KiB
    assert s.write(b"d" * 2 * MiB) == 1 * MiB - 305_100  # the capacity still caps T - A
    assert s.allocated == 1 * MiB and s.free == 0
    s.ack(1 * MiB - 300_000)  # 300000 held: more than a quarter, the ring stays
    assert s.allocated == 1 * MiB
    s.ack(1 * MiB - 200_000)  # 200000 held, under a quarter: the ring that holds twice that
    assert s.allocated == 512 * KiB
    s.ack(1 * MiB - 1000)
    assert s.allocated == 4 * KiB
    s.ack(1 * MiB)  # drained: nothing held, nothing allocated
    assert s.allocated == 0
    assert (s.acked, s.queued, s.tail) == (1 * MiB, 1 * MiB, 1 * MiB)  # (Q followed A)


@pytest.mark.parametrize("mod", BACKENDS)
def test_bytes_survive_every_move(mod: Any) -> None:
    """Grow and shrink across the ring's end, with a rewind: every byte comes out in order."""
    import random

    rng = random.Random(5)
    src = rng.randbytes(3 * MiB)
    s = mod.Spool(200_000)
    written, out, sizes = 0, bytearray(), set()
    while len(out) < len(src):
        burst = rng.choice([10, 3000, 70_000, 250_000])
        written += s.write(memoryview(src)[written:written + burst])
        sizes.add(s.allocated)
        out += s.read(rng.randint(0, 90_000))
        s.ack(len(out) - rng.randint(0, min(len(out) - s.acked, 50_000)))
        sizes.add(s.allocated)
        if rng.random() < 0.05:
            s.rewind()
            del out[s.acked:]
    assert bytes(out) == src
    assert {4 * KiB, 128 * KiB, 200_000} <= sizes  # it went through small and capped rings


@pytest.mark.parametrize("mod", BACKENDS)
def test_a_view_outlives_the_ring_it_was_taken_from(mod: Any) -> None:
    s = mod.Spool(1 * MiB)
    s.write(b"first bytes")
    view = s.peek(100)
    s.write(b"x" * 100_000)  # the ring moves to a bigger one
    assert s.allocated == 128 * KiB
    later = s.peek(5)
    s.ack(s.tail)  # drained: the ring is freed (or, if viewed, left to its views)
    assert s.allocated == 0
    gc.collect()
    assert view.tobytes() == b"first bytes"
    assert later.tobytes() == b"first"
    s.write(b"again")
    assert s.read(5) == b"again"


@pytest.mark.parametrize("mod", BACKENDS)
def test_small_capacity_never_allocates_beyond_it(mod: Any) -> None:
    s = mod.Spool(1000)
    s.write(b"z" * 5000)
    assert s.allocated == 1000 and s.tail == 1000
    s.ack(999)
    assert s.allocated == 1000  # the smallest ring there is: nothing to shrink to
    s.ack(1000)
    assert s.allocated == 0


def test_model_out_of_memory_takes_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    s = pynative.Spool(1 * MiB)
    s.write(b"a" * 3000)
    assert s.allocated == 4 * KiB

    def no_memory(size: int) -> bytearray:
        raise MemoryError

    monkeypatch.setattr(pynative, "_allocate", no_memory)
    assert s.write(b"b" * 5000) == 1096  # what the current ring holds: back-pressure
    assert s.allocated == 4 * KiB and s.tail == 4096
    with pytest.raises(NativeMemoryError):
        s.write(b"c")  # nothing fits and the ring cannot grow
    assert s.tail == 4096
    s.ack(4000)  # a shrink that cannot allocate keeps the ring
    assert s.allocated == 4 * KiB
    monkeypatch.undo()
    assert s.write(b"d" * 10_000) == 10_000
    assert s.allocated == 16 * KiB
    assert s.read(100) == b"b" * 96 + b"d" * 4  # (the ack moved Q to 4000)


_HOOKS = """
#include <stddef.h>
void *test_malloc(size_t n);
void test_free(void *p);
"""

_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "quelay_native.h"

static int fail_next = 0;
static long live = 0;

void *test_malloc(size_t n)
{
    if (fail_next > 0) {
        fail_next--;
        return NULL;
    }
    live++;
    return malloc(n);
}

void test_free(void *p)
{
    if (p != NULL)
        live--;
    free(p);
}

#define CHECK(c) \
    do { if (!(c)) { printf("FAIL line %d: %s\n", __LINE__, #c); return 1; } } while (0)

static uint64_t rng = 88172645463325252ULL;
static uint64_t next(void)
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

int main(void)
{
    static char data[1 << 20], out[1 << 20];
    qn_spool s;
    uint8_t *lent;
    uint64_t i, a = 0, q = 0, t = 0;
    for (i = 0; i < sizeof data; i++)
        data[i] = (char)(next() & 0xff);

    CHECK(qn_spool_init(&s, 65536) == QN_OK);
    CHECK(s.size == 0 && s.buf == NULL && live == 0);
    CHECK(qn_spool_write(&s, data, 3000) == 3000 && s.size == 4096 && live == 1);
    fail_next = 1; /* no memory to grow: take what fits */
    CHECK(qn_spool_write(&s, data + 3000, 5000) == 1096 && s.size == 4096 && s.tail == 4096);
    fail_next = 1; /* full and no memory: an error, nothing changed */
    CHECK(qn_spool_write(&s, data + 4096, 10) == QN_ENOMEM && s.tail == 4096);
    CHECK(qn_spool_write(&s, data + 4096, 4000) == 4000 && s.size == 8192 && live == 1);
    CHECK(qn_spool_read(&s, out, sizeof out) == 8096 && memcmp(out, data, 8096) == 0);
    fail_next = 1; /* a shrink that cannot allocate keeps the ring */
    CHECK(qn_spool_ack(&s, 8000) == QN_OK && s.size == 8192);
    CHECK(qn_spool_ack(&s, 8096) == QN_OK && s.size == 0 && s.buf == NULL && live == 0);

    /* A lent ring is forgotten by a move, never freed by the spool. */
    CHECK(qn_spool_write(&s, data, 100) == 100);
    lent = qn_spool_lend(&s);
    CHECK(lent != NULL && lent == s.buf && s.lent);
    CHECK(qn_spool_write(&s, data, 9000) == 9000 && s.size == 16384 && !s.lent && live == 2);
    qn_spool_free_ring(lent);
    CHECK(live == 1);
    lent = qn_spool_lend(&s);
    qn_spool_fini(&s); /* lent: left to the caller */
    CHECK(live == 1 && s.released && s.buf == NULL);
    qn_spool_free_ring(lent);
    CHECK(live == 0);
    CHECK(qn_spool_write(&s, data, 1) == QN_ERELEASED);
    qn_spool_fini(&s);

    /* Random traffic against a reference, allocations failing now and then. */
    CHECK(qn_spool_init(&s, 100000) == QN_OK);
    for (i = 0; i < 200000; i++) {
        uint64_t op = next() % 8, n;
        int64_t rc;
        fail_next = (next() % 16 == 0);
        if (op < 3) {
            n = next() % 40000;
            if (t + n > sizeof data)
                n = 0;
            rc = qn_spool_write(&s, data + t, n);
            CHECK(rc >= 0 || (rc == QN_ENOMEM && s.size == t - a && n > 0));
            if (rc > 0)
                t += (uint64_t)rc;
            if (t > sizeof data / 2) { /* start over at offset 0 */
                qn_spool_fini(&s);
                CHECK(live == 0);
                CHECK(qn_spool_init(&s, 100000) == QN_OK);
                a = q = t = 0;
            }
        } else if (op < 6) {
            n = next() % 30000;
            rc = qn_spool_read(&s, out, n);
            CHECK(rc >= 0 && memcmp(out, data + q, (size_t)rc) == 0);
            q += (uint64_t)rc;
        } else if (op == 6) {
            n = a + (t > a ? next() % (t - a + 1) : 0);
            CHECK(qn_spool_ack(&s, n) == QN_OK);
            if (n > a)
                a = n;
            if (q < a)
                q = a;
        } else {
            CHECK(qn_spool_rewind(&s) == QN_OK);
            q = a;
        }
        CHECK(s.acked == a && s.queued == q && s.tail == t);
        CHECK(t - a <= s.size && s.size <= s.capacity && (s.size == 0) == (s.buf == NULL));
        CHECK(live == (s.buf != NULL));
    }
    qn_spool_fini(&s);
    CHECK(live == 0);
    printf("ok\n");
    return 0;
}
"""


def _compile(tmp_path: Path, cc: str, sanitize: bool) -> subprocess.CompletedProcess[str]:
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"] if sanitize else []
    return subprocess.run(
        [cc, "-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *flags,
         "-I", str(ROOT / "native"), "-include", str(tmp_path / "hooks.h"),
         "-DQN_MALLOC=test_malloc", "-DQN_FREE=test_free",
         str(ROOT / "native" / "spool.c"), str(tmp_path / "driver.c"),
         "-o", str(tmp_path / "driver")],
        capture_output=True, text=True, timeout=120)


def test_c_spool_with_a_failing_counting_allocator(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "a C compiler is required to build quelay at all"
    (tmp_path / "hooks.h").write_text(_HOOKS)
    (tmp_path / "driver.c").write_text(_DRIVER)
    built = _compile(tmp_path, cc, sanitize=True)
    if built.returncode != 0:  # a compiler without the sanitizer runtimes
        built = _compile(tmp_path, cc, sanitize=False)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(tmp_path / "driver")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"


async def test_a_writer_waits_for_acks_when_the_spool_cannot_grow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory with bytes in flight: the writer is held back (their ack frees room),
    not failed; with nothing in flight there is nothing to wait for: a clear error."""
    import trio
    import trio.testing

    from quelay.agent.pipes import OutboundPipe

    pipe = OutboundPipe(1 * MiB)
    pipe.spool = pynative.Spool(1 * MiB)  # (the model's one allocation can be made to fail)
    assert await pipe.write(memoryview(b"a" * 4096)) == 4096  # one full smallest ring
    failing = True
    allocate = pynative._allocate

    def maybe(size: int) -> bytearray:
        if failing:
            raise MemoryError
        return allocate(size)

    monkeypatch.setattr(pynative, "_allocate", maybe)
    taken: list[int] = []
    async with trio.open_nursery() as nursery:
        async def writer() -> None:
            taken.append(await pipe.write(memoryview(b"b" * 100)))

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [] and pipe.spool.tail == 4096  # held back, nothing lost
        assert pipe.read(4096) == b"a" * 4096
        failing = False
        pipe.acked(4096)  # the peer has them: the ring is freed, the writer retries
    assert taken == [100] and pipe.spool.allocated == 4 * KiB
    assert pipe.read(100) == b"b" * 100
    pipe.acked(4196)
    failing = True
    with pytest.raises(NativeMemoryError):
        await pipe.write(memoryview(b"c"))  # nothing in flight whose ack could help
