"""
Collect runs' results into a CSV: the last stdout line of each log is its script's JSON result. Columns are the
fields named; a row is appended per log. Run scripts use this instead of scraping logs.

    python -m dev.results_csv results.csv log1.txt log2.txt --fields depth num_params val_bpb core_metric
"""

import csv
import json
import os

from nanochat.common import Flags, UserError, print_result, run_cli


def last_result(path):
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    if not lines:
        raise UserError(f"{path} has no JSON result line: did its run finish?")
    return json.loads(lines[-1])


def main(argv=None):
    p = Flags(description="Append runs' JSON results to a CSV.")
    p.add_argument("csv")
    p.add_argument("logs", nargs="+")
    p.add_argument("--fields", nargs="+", required=True)
    args = p.parse_args(argv)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(args.fields)
        for log in args.logs:
            result = last_result(log)
            writer.writerow([result.get(k, "") for k in args.fields])
    print_result("results_csv", csv=args.csv, rows=len(args.logs))


if __name__ == "__main__":
    run_cli(main)
