"""Run a script with Python stack dumps on demand: ``python scripts/dev/stack_dump.py LOG script.py
ARGS...`` writes every thread's stack to LOG each time the process gets SIGUSR1 (``kill -USR1
PID``), so a device run can see where a slow step spends its time without a profiler."""

import faulthandler
import os
import runpy
import signal
import sys

log = open(sys.argv[1], "a")  # kept open for the life of the process
faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
script = sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
