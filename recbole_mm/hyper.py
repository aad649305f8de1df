"""Hyperparameter tuning with RecBole's ``HyperTuning`` and recbole-mm's objective.

``python run_hyper.py --model=LRURec --dataset=ml-100k --params_file=properties/hyper/LRURec.hyper``
"""

from __future__ import annotations

import argparse
import ast
import sys

from recbole_mm.errors import ConfigError, UserError


def read_params_file(path: str) -> dict:
    """A RecBole params file (``name choice [a,b]`` / ``name uniform low,high`` / ``quniform
    low,high,q`` / ``loguniform low,high`` per line) as a hyperopt space, parsed without ``eval``.

    Bad lines are one-line :class:`~recbole_mm.errors.ConfigError` s naming the file and line.
    """
    from hyperopt import hp

    def bad(lineno, text, why):
        return ConfigError(f"params file {path}, line {lineno}: {why} (line: {text.strip()[:80]!r})")

    try:
        with open(path, encoding="utf-8") as fp:
            lines = fp.read().splitlines()
    except OSError as e:
        raise ConfigError(f"params file {path}: cannot read it ({e.strerror}); check the path") from None
    space = {}
    for lineno, line in enumerate(lines, start=1):
        parts = line.strip().split(" ")
        if len(parts) < 3:
            continue
        name, kind, text = parts[0], parts[1], "".join(parts[2:])
        if kind == "choice":
            try:
                values = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise bad(lineno, line, "choice values must be a literal list such as [0.1,0.3] "
                                        "(expressions are not evaluated)") from None
            if not isinstance(values, (list, tuple)) or not values:
                raise bad(lineno, line, "choice values must be a non-empty list")
            space[name] = hp.choice(name, list(values))
            continue
        arity = {"uniform": 2, "quniform": 3, "loguniform": 2}.get(kind)
        if arity is None:
            raise bad(lineno, line, f"unknown type {kind!r}; use choice, uniform, quniform or loguniform")
        try:
            numbers = [float(v) for v in text.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) != arity:
            raise bad(lineno, line, f"{kind} needs {arity} comma-separated numbers")
        space[name] = getattr(hp, kind)(name, *numbers)
    return space


def safe_hyper_tuning():
    """RecBole's ``HyperTuning`` whose params files are parsed without ``eval`` (:func:`read_params_file`)."""
    from recbole.trainer import HyperTuning

    class SafeHyperTuning(HyperTuning):
        """``HyperTuning`` reading params files with :func:`read_params_file` instead of ``eval``."""

        _build_space_from_file = staticmethod(read_params_file)

    return SafeHyperTuning


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
    try:
        return _run(args, rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args, rest) -> int:
    from recbole_mm.quick_start import objective_function

    def objective(config_dict, config_file_list):
        return objective_function({**config_dict, "model": args.model, "dataset": args.dataset},
                                  config_file_list, argv=rest)

    hp = safe_hyper_tuning()(objective, params_file=args.params_file, algo=args.algo, max_evals=args.max_evals,
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
