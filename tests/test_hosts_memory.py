"""hosts.return_free_memory: freed heap memory leaves the resident set."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import os
from lamp_jax.hosts import return_free_memory
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
blocks = [bytes(2000) for _ in range(200_000)]  # 400 MB of malloc'd (not mmap'd) blocks
tail = bytes(2000)  # malloc'd after them: the heap's top stays in use
del blocks
freed = rss()
return_free_memory()
print(freed, rss())
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc_trim")
def test_freed_heap_blocks_leave_the_resident_set():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    freed, trimmed = (int(x) for x in out.stdout.split())
    # glibc keeps the freed blocks mapped (measured 544 MB resident); trimmed: 154 MB.
    assert freed - trimmed > 300 * 2**20, (freed, trimmed)
