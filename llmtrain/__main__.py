import os

# Before torch loads OpenMP: worker threads sleep instead of spinning while they wait. On a CPU shared with
# another busy process, spinning made the tiny demo 7x slower (530 vs 3,700 tokens/s on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llmtrain.cli import main
from llmtrain.process_exit import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)
