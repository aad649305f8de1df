#!/usr/bin/env bash
# Prepare the four real datasets from shared/data and record their statistics (PRIME Table 1
# columns) plus the counts RecBole itself loads, in benchmarks/results/datasets.md.
#
#   bash benchmarks/prepare_datasets.sh [SHARED_DIR] [OUT_DIR]     (defaults: ../shared/data dataset)
#
# Run from the repository root. PYTHON overrides the interpreter (default: python).
set -euo pipefail
SHARED=${1:-../shared/data}
OUT=${2:-dataset}
PY=${PYTHON:-python}
RESULT=benchmarks/results/datasets.md
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

for name in beauty ml-100k-posters ml-1m-llamarec hm; do
  "$PY" -m recbole_mm.data prepare "$name" --shared "$SHARED" --out "$OUT"
done

STATS=$("$PY" -m recbole_mm.data stats --data-path "$OUT" --verify-images beauty ml-100k-posters ml-1m-llamarec hm)
RECBOLE=$("$PY" - "$OUT" <<'PY'
import logging, sys, warnings
warnings.filterwarnings("ignore", category=FutureWarning)
from recbole.config import Config
from recbole.data import create_dataset
logging.disable(logging.CRITICAL)
print("| dataset | users | items | interactions |\n|---|---:|---:|---:|")
for name in ["beauty", "ml-100k-posters", "ml-1m-llamarec", "hm"]:
    cfg = Config(model="SASRec", dataset=name, config_file_list=[f"properties/dataset/{name}.yaml"],
                 config_dict={"data_path": sys.argv[1], "train_neg_sample_args": None,
                              "show_progress": False, "save_dataset": False})
    ds = create_dataset(cfg)
    print(f"| {name} | {ds.user_num - 1:,} | {ds.item_num - 1:,} | {ds.inter_num:,} |")
PY
)
{
  echo "# Prepared datasets"
  echo
  echo "Made by \`bash benchmarks/prepare_datasets.sh $SHARED $OUT\` on $(date -u +%Y-%m-%d), commands:"
  echo
  echo '```'
  for name in beauty ml-100k-posters ml-1m-llamarec hm; do
    echo "python -m recbole_mm.data prepare $name --shared $SHARED --out $OUT"
  done
  echo "python -m recbole_mm.data stats --data-path $OUT --verify-images beauty ml-100k-posters ml-1m-llamarec hm"
  echo '```'
  echo
  echo "Statistics (PRIME Table 1 columns; #images = items whose image decodes; density = #inter / (#users x #items)):"
  echo
  echo "$STATS"
  echo
  echo "Counts RecBole 1.2.1 loads with properties/dataset/<name>.yaml (create_dataset):"
  echo
  echo "$RECBOLE"
} > "$RESULT"
cat "$RESULT"
