"""Train and evaluate a model: ``python run_recbole_mm.py --model=LRURec --dataset=ml-100k [--key=value ...]``."""

import sys

from recbole_mm.cli import main

if __name__ == "__main__":
    sys.exit(main())
