"""`python -m llmtrain.launch status [--all] [--json] | cancel JOBID... | cancel --all` for cluster=slurm jobs."""

import argparse
import sys

from llmtrain.errors import UserError
from llmtrain.launch import jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.launch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="state, restarts, progress, exit code and error of your jobs")
    st.add_argument("--all", action="store_true", help="also jobs slurmctld no longer knows")
    st.add_argument("--json", action="store_true", help="one JSON object per job")
    ca = sub.add_parser("cancel", help="scancel jobs you submitted")
    ca.add_argument("job_ids", nargs="*")
    ca.add_argument("--all", action="store_true", help="every tracked job that is still active")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            print(jobs.status(all_jobs=args.all, as_json=args.json))
        else:
            print(jobs.cancel(args.job_ids, all_active=args.all))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
