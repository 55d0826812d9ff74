"""One benchmark case per fresh interpreter: a case's allocations, compiled kernels and thread pools never
carry into the next, so each case's time and peak memory are its own.

A benchmark's ``main`` re-runs its own script with ``--one CASE...`` for every case and reads back the JSON
object that the case prints last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def passthrough(argv: list[str]) -> list[str]:
    """The command line without ``--json PATH`` (only the parent writes the results file)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    return kept


def run_case(script: str, case: list[str]) -> dict[str, Any]:
    """``script`` (the benchmark, with this process's arguments) run once for ``case``; its last output line."""
    out = subprocess.run(
        [sys.executable, script, *passthrough(sys.argv[1:]), "--one", *case],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
