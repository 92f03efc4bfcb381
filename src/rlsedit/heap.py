"""Keep large temporary buffers out of glibc's heap.

Value-target optimisation allocates and frees hundreds of MiB of activations for every group
of requests. glibc serves a request above its mmap threshold with its own ``mmap`` and unmaps
it on ``free``, so that memory goes back to the system at once. But glibc raises the threshold
each time it frees such a block (up to 32 MiB on 64-bit systems), so after the first groups the
same activations come from the heap instead, where the freed space fragments and stays
resident (benchmarks/SPEED.md, "Memory"). Setting the threshold explicitly turns that
adjustment off (``mallopt(3)``: the dynamic threshold is disabled once M_MMAP_THRESHOLD,
M_TRIM_THRESHOLD, M_TOP_PAD or M_MMAP_MAX is set).

The ``rlsedit`` command applies it once at start-up; a program that uses the library may call
:func:`pin_mmap_threshold` itself. It changes where memory comes from, never what is computed.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt's parameter number for the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3

# 1 MiB: the tensors of one target group's activations and logits run from about 1 to a few
# tens of MiB (by shape, SmolLM2 at 28 rows: MLP activations ~3 MiB, logits ~12 MiB); smaller
# blocks stay on the heap, where their fragmentation is small and they cost no system call each.
DEFAULT_MMAP_THRESHOLD = 1 << 20
# glibc refuses thresholds above half its heap size on 64-bit systems
MAX_MMAP_THRESHOLD = 32 << 20


def _libc_function(name: str, argtypes: tuple, restype):
    """``name`` from the C library already loaded into this process (as in
    eval/_sandbox_child.py; find_library("c") would run ldconfig at every start), or None
    where it has no such function (not glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        log.debug("no %s in this process's C library; heap policy left as it is", name)
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


def pin_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mapping, for the whole process.

    Returns True when glibc accepted the setting, False where the C library is not glibc (or
    refuses the value); then nothing changed.
    """
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"nbytes must be an int in 1..{MAX_MMAP_THRESHOLD}, got {nbytes!r}")
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    accepted = mallopt(M_MMAP_THRESHOLD, nbytes) == 1
    if not accepted:
        log.debug("mallopt refused an mmap threshold of %d bytes", nbytes)
    return accepted


def release_free_memory() -> bool:
    """Give every whole free page of the heap back to the system (glibc's ``malloc_trim(0)``).

    Memory freed inside the heap stays resident while live blocks sit above it: glibc trims
    only the top. Parsing a large tokenizer file is the sharp case — the parse tree is freed
    once the vocabulary is built, behind it: Gemma 3's 262,144-token ``tokenizer.json`` read
    alone by ``tokenizers.Tokenizer.from_file`` leaves 296 MiB resident, 115 after a trim.
    In a whole :func:`~rlsedit.model.load.load_model` of Gemma 3 the trim gives back less,
    22 MiB (566 → 544) under glibc's default policy and 3 MiB with the pinned mmap threshold,
    which keeps most large temporaries off the heap anyway. ``malloc_trim`` releases free pages
    wherever they lie; it moves no live block. Returns True where it ran (glibc), else False.
    """
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True
