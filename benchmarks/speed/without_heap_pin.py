"""Run the ``rlsedit`` command with glibc's dynamic mmap threshold (the pin disabled).

The baseline arm of benchmarks/speed/smollm2-n200-b20-heap: the same command line as
``rlsedit``, e.g. ``python benchmarks/speed/without_heap_pin.py -v bench speed ...``.
"""

import sys

import rlsedit.cli as cli

cli.pin_mmap_threshold = lambda: False  # leave glibc's own threshold policy in place
sys.exit(cli.main(sys.argv[1:]))
