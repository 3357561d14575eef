"""
What the code sandbox costs per program: the median wall time of a trivial program and of a typical HumanEval check
(problem 0's canonical solution with its tests), with the Python layer alone (the sandbox before namespaces) and
with bubblewrap's namespaces (now), run alternately so that both see the same machine load.

    python -m dev.bench_execution --runs 50
"""

import statistics
import time

from nanochat.common import Flags, print0, print_result, run_cli
from nanochat.execution import execute_code, sandbox_mode
from tasks.humaneval import HumanEval, check_program


def main(argv=None):
    p = Flags(description="Benchmark the code sandbox's cost per program.")
    p.add_argument("--runs", type=int, default=30, help="runs of each program in each mode")
    args = p.parse_args(argv)
    problem = HumanEval()[0]["problem"]
    solution = problem["prompt"] + problem["canonical_solution"]
    programs = {"trivial": "pass", "humaneval": check_program(problem, solution)}
    mode = sandbox_mode()
    modes = {"python_only": None, "namespaces": "bwrap"} if mode == "namespaces" else {"python_only": None}
    times = {(program, m): [] for program in programs for m in modes}
    for _ in range(args.runs):
        for program, code in programs.items():
            for m, bwrap in modes.items():
                t0 = time.perf_counter()
                result = execute_code(code, bwrap=bwrap)
                times[program, m].append(time.perf_counter() - t0)
                assert result.success, f"{program} failed in mode {m}: {result.error}"
    median_ms = {program: {m: round(1000 * statistics.median(times[program, m]), 1) for m in modes}
                 for program in programs}
    print0(f"sandbox mode here: {mode}; median wall time per program over {args.runs} runs")
    print0(f"{'program':<10} " + " ".join(f"{m:>12}" for m in modes))
    for program, row in median_ms.items():
        extra = f"   namespaces cost {row['namespaces'] - row['python_only']:+.1f} ms" if len(modes) == 2 else ""
        print0(f"{program:<10} " + " ".join(f"{row[m]:>9.1f} ms" for m in modes) + extra)
    print_result("bench_execution", mode=mode, runs=args.runs, median_ms=median_ms)


if __name__ == "__main__":
    run_cli(main)
