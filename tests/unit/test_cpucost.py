"""benchmarks.cpucost: CPU per process group, read from the real processes (psutil)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from benchmarks.cpucost import idle, spent_by_group

BUSY = "import time\nend = time.time() + 4\nwhile time.time() < end: pass\n"


def test_spent_by_group_counts_a_new_process_from_zero() -> None:
    before = {1: ("engine core", 10.0), 2: ("ray system", 3.0)}
    after = {1: ("engine core", 10.5), 2: ("ray system", 3.25), 3: ("ray system", 0.5)}
    assert spent_by_group(before, after) == {"engine core": 0.5, "ray system": 0.75}


def test_idle_reports_a_busy_process_in_its_group_and_nothing_for_quiet_ones() -> None:
    # The command line names the group ("EngineCore"), as vLLM's engine process's title does.
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "EngineCore"])
    quiet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)", "gcs_server"])
    try:
        result = asyncio.run(idle(1.5))
    finally:
        busy.kill()
        quiet.kill()
        busy.wait()
        quiet.wait()
    percent = result["cpu_percent_of_core"]
    assert result["idle_s"] == 1.5
    assert percent["engine core"] > 40  # a spinning loop: most of a core even on a loaded 2-core box
    assert percent["ray system"] < 10


def test_cli_idle_prints_one_json_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpucost", "http://127.0.0.1:9/v1", "m", "quiet", "--idle", "0.2"],
        capture_output=True, text=True, check=True,
    )
    line = json.loads(out.stdout)
    assert line["label"] == "quiet" and line["idle_s"] == 0.2
    assert isinstance(line["cpu_percent_of_core"], dict)
