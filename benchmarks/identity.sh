#!/bin/bash
# usage: benchmarks/identity.sh TREE OUTDIR: the three identity commands of a refactoring (a run, the quickstart
# compare, a small ablation) from the checkout TREE into OUTDIR; compare two OUTDIRs with benchmarks/identity_compare.py
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
TREE=$(realpath "$1"); L=$(realpath -m "$2")
rm -rf $L; mkdir -p $L
cd $TREE
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TOPOCAM_CACHE_DIR=$L/cache PYTHONPATH=$TREE
PY=${PY:-$HERE/../.venv/bin/python}
START=$(date +%s)
$PY cli.py run --dataset synthetic2d --seeds 0,1 --out $L/run --runs-dir $L/mlruns --quiet > $L/run.log 2>&1; echo "run rc=$? $(( $(date +%s)-START ))s" >> $L/status
$PY cli.py study compare studies/quickstart.toml --runs-dir $L/mlruns --out $L/compare --quiet > $L/compare.log 2>&1; echo "compare rc=$? $(( $(date +%s)-START ))s" >> $L/status
$PY cli.py ablate studies/quickstart.toml --suite paper --only tau,beyond --seeds 0,1 --runs-dir $L/mlruns --out $L/ablate --quiet > $L/ablate.log 2>&1; echo "ablate rc=$? $(( $(date +%s)-START ))s" >> $L/status
