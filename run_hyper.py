"""Tune hyperparameters: ``python run_hyper.py --model=LRURec --dataset=ml-100k --params_file=FILE``."""

import sys

from recbole_mm.hyper import main

if __name__ == "__main__":
    sys.exit(main())
