"""glibc malloc tuning for CPU training: big blocks come from the heap, and freed ones stay mapped for reuse."""

from __future__ import annotations

import subprocess
import sys

# In a child process: the tuning is process-wide and must not leak into the test session.
PROBE = """
import ctypes, json
from llmbox_engine.train.host_memory import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def big_block():
    mapped = libc.mallinfo2().hblks  # blocks served by their own mmap
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblks - mapped
    libc.free(block)
    return {"own_mapping": mapped, "heap_after_free": libc.mallinfo2().arena}

before = big_block()
tuned = keep_freed_memory()
print(json.dumps({"before": before, "tuned": tuned, "after": big_block()}))
"""


def test_keep_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them() -> None:
    import json

    found = json.loads(subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True).stdout)
    assert found["before"]["own_mapping"] == 1  # glibc's default: a 64 MB block is its own mapping
    assert found["before"]["heap_after_free"] < 64 << 20  # and unmapped again on free
    assert found["tuned"] is True
    assert found["after"]["own_mapping"] == 0
    assert found["after"]["heap_after_free"] >= 64 << 20  # freed, still mapped, ready for the next pass
