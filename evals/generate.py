"""Write the data of the linmu_* tasks into evals/data from a seed: `python evals/generate.py --help`."""

import sys
from pathlib import Path

from linmu_cli.evaluation.tasks import main

if __name__ == "__main__":
    sys.exit(main(["--evals-dir", str(Path(__file__).resolve().parent), *sys.argv[1:]]))
