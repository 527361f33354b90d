"""cffi build script for quelay's hot path (``quelay.native._quelay_native``).

Used by setup.py (``cffi_modules=["build_native.py:ffibuilder"]``), so
``pip install .`` / ``pip install -e .`` compile it.  For a quick local
build: ``python build_native.py`` (writes the module next to the package).

The C sources live in ``native/``: plain C99, no Python.h, no global state.
A C compiler is required; there is deliberately no pure-Python fallback at
install time (the reference model is chosen only with QUELAY_PURE_PYTHON=1).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_DIR = "native"
SOURCES = [f"{NATIVE_DIR}/spool.c", f"{NATIVE_DIR}/drr.c"]
HEADER = f"{NATIVE_DIR}/quelay_native.h"

# setup.py commands that compile the extension; metadata-only commands
# (egg_info, dist_info, sdist, ...) must work without a compiler.
_BUILD_COMMANDS = {
    "build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install",
    "bdist_egg", "bdist",
}

CDEF = """
#define QN_OK ...
#define QN_ENOMEM ...
#define QN_EINVAL ...
#define QN_ECLOSED ...
#define QN_ERANGE ...
#define QN_EEXIST ...
#define QN_ENOENT ...
#define QN_EOVERFLOW ...
#define QN_ERELEASED ...
#define QN_SPOOL_MAX_CAPACITY ...
#define QN_SPOOL_MIN_RING ...
#define QN_DRR_PRIORITY_MIN ...
#define QN_DRR_PRIORITY_MAX ...
#define QN_DRR_MAX_BASE_QUANTUM ...
#define QN_DRR_MAX_STREAMS ...
#define QN_DRR_MAX_BYTES ...

typedef struct qn_spool {
    uint8_t *buf;
    uint64_t size;
    uint64_t capacity;
    uint64_t acked;
    uint64_t queued;
    uint64_t tail;
    uint64_t moves;
    int closed;
    int released;
    int lent;
} qn_spool;

int qn_spool_init(qn_spool *s, uint64_t capacity);
void qn_spool_fini(qn_spool *s);
uint8_t *qn_spool_lend(qn_spool *s);
void qn_spool_free_ring(uint8_t *ring);
int64_t qn_spool_write(qn_spool *s, const char *data, size_t len);
int64_t qn_spool_read(qn_spool *s, char *dst, size_t len);
int64_t qn_spool_peek(const qn_spool *s, uint64_t max, uint64_t *ring_offset);
int qn_spool_advance(qn_spool *s, uint64_t n);
int qn_spool_ack(qn_spool *s, uint64_t offset);
int qn_spool_rewind(qn_spool *s);
int qn_spool_close(qn_spool *s);

typedef struct qn_drr qn_drr;
typedef struct qn_drr_stream_info {
    uint64_t backlog;
    uint64_t deficit;
    uint64_t quantum;
    int priority;
    int control;
} qn_drr_stream_info;

int qn_drr_create(uint64_t base_quantum, qn_drr **out);
void qn_drr_destroy(qn_drr *d);
int qn_drr_add(qn_drr *d, uint64_t id, int priority, int control);
int qn_drr_remove(qn_drr *d, uint64_t id);
int qn_drr_set_priority(qn_drr *d, uint64_t id, int priority);
int qn_drr_set_backlog(qn_drr *d, uint64_t id, uint64_t backlog);
int qn_drr_set_base_quantum(qn_drr *d, uint64_t base_quantum);
uint64_t qn_drr_base_quantum(const qn_drr *d);
uint64_t qn_drr_active(const qn_drr *d);
int qn_drr_info(const qn_drr *d, uint64_t id, qn_drr_stream_info *out);
int qn_drr_contains(const qn_drr *d, uint64_t id);
uint64_t qn_drr_count(const qn_drr *d);
int64_t qn_drr_schedule(qn_drr *d, uint64_t budget, const uint64_t **grants);
"""


class CompilerMissing(SystemExit):
    """Raised (as a clean one-line exit) when the module cannot be compiled."""


def _needs_compiler(argv: list[str]) -> bool:
    return any(arg in _BUILD_COMMANDS for arg in argv[1:])


def _find_compiler() -> str | None:
    """The C compiler setuptools will call (honours $CC), if it exists."""
    if os.name == "nt":  # MSVC is located by setuptools itself
        return "msvc"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    exe = cc.split()[0]
    return shutil.which(exe)


def check_toolchain() -> None:
    """Fail early with one clear message instead of a compiler traceback."""
    if _find_compiler() is None:
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
        raise CompilerMissing(
            "error: quelay needs a C compiler to build its native module "
            f"(tried {cc.split()[0]!r}, not found). Install one, e.g. "
            "'apt-get install gcc' (Debian/Ubuntu) or 'dnf install gcc', then "
            "run 'pip install .' again."
        )
    include = sysconfig.get_paths().get("include")
    if os.name != "nt" and include and not os.path.exists(os.path.join(include, "Python.h")):
        raise CompilerMissing(
            "error: quelay needs the Python development headers to build its "
            f"native module (no Python.h in {include}). Install them, e.g. "
            "'apt-get install python3-dev', then run 'pip install .' again."
        )


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "quelay.native._quelay_native",
    '#include "quelay_native.h"\n',
    sources=SOURCES,
    include_dirs=[NATIVE_DIR],
    depends=[HEADER],
)

if __name__ == "__cffi__" and _needs_compiler(sys.argv):
    # Loaded by setuptools' cffi_modules hook for a build command.
    check_toolchain()

if __name__ == "__main__":
    os.chdir(HERE)
    check_toolchain()
    ffibuilder.compile(verbose=True)
