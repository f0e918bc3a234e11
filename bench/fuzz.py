"""Fuzzing for as long as asked (issue 19, item 7): the seeded mutation fuzzer of
tests/fuzzing.py against a fresh `enhance-node serve`, then the ledger checked against storage.
Prints the answers seen and any problem; exits 1 when there was one.

    .venv/bin/python bench/fuzz.py [--cases 100000] [--seed 19]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzzing import Fuzzer, ledger_problems  # noqa: E402
from tests.helpers import NodeProcess, free_port, toml_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="enhance-fuzz-"))
    port = free_port()
    node = NodeProcess(toml_config(tmp, port, extra_node="negotiation_timeout = 2"), port, tmp).start()
    started = time.monotonic()
    try:
        report = Fuzzer(port, args.seed).run(
            args.cases, lambda n: print(f"{n} cases, {n / (time.monotonic() - started):.0f}/s", flush=True)
        )
        problems = report.problems + ledger_problems(node.ledger, node.storage)
        if node.proc is not None and node.proc.poll() is not None:
            problems.append(f"the node exited {node.proc.returncode}")
    finally:
        node.stop()
    print(f"\n{report.cases} cases in {time.monotonic() - started:.0f} s (seed {args.seed}), node logs in {tmp}")
    print("C-STORE answers:", dict(report.statuses.most_common()))
    print("A-ASSOCIATE-RQ answers:", dict(report.pdu_answers.most_common()))
    print("problems:", problems or "none")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
