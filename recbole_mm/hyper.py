"""Hyperparameter tuning with RecBole's ``HyperTuning`` and recbole-mm's objective.

``python run_hyper.py --model=LRURec --dataset=ml-100k --params_file=properties/hyper/LRURec.hyper``
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run_hyper.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params_file", required=True, help="RecBole params file: `name choice [a,b]` per line")
    parser.add_argument("--config_files", default=None, help="space-separated fixed yaml files")
    parser.add_argument("--algo", default="exhaustive", choices=["exhaustive", "random", "bayes"])
    parser.add_argument("--max_evals", type=int, default=100)
    parser.add_argument("--early_stop", type=int, default=10)
    parser.add_argument("--output_file", default=None, help="default: hyper_<model>.result")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from recbole.trainer import HyperTuning

    from recbole_mm.quick_start import objective_function

    def objective(config_dict, config_file_list):
        return objective_function({**config_dict, "model": args.model, "dataset": args.dataset},
                                  config_file_list, argv=rest)

    hp = HyperTuning(objective, params_file=args.params_file, algo=args.algo, max_evals=args.max_evals,
                     early_stop=args.early_stop,
                     fixed_config_file_list=args.config_files.split() if args.config_files else None)
    hp.run()
    output = args.output_file or f"hyper_{args.model}.result"
    hp.export_result(output_file=output)
    print("best params:", hp.best_params)
    print("best result:", hp.params2result[hp.params2str(hp.best_params)])
    print("all results written to", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
