#!/usr/bin/env bash
# Run one shipped GPU study on a bare GPU machine and keep its record (the commands behind the study rows of
# docs/benchmarks.md).
#   bash benchmarks/gpu_study.sh STUDY_NAME OUT_DIR SECONDS    e.g.  seed-cnn /tmp/out 530
# With a wheel bundle in .whl/ (../shared/device/gpu-wheels.sh) it installs optuna, mlflow and deepspeed from it
# offline. With no CIFAR-10 in data/cifar-10-batches-py it writes a CIFAR-format set in its place
# (plugins._cifar.write_tiny_cifar: 20,000 + 2,000 class-coloured noise images; easy, so accuracy is ~1.0):
# the GPU machines here have no network to fetch the real one.
# SECONDS goes to `harness study --timeout` (no new trial starts after it). GPUS=0 (or 0,1) limits the GPU slots
# the study uses (default: every visible GPU, one trial per GPU at a time); NTRIALS overrides n_trials; SAMPLER=random
# runs a copy of the study file with Optuna's random sampler (for comparisons where TPE's choices should not differ
# by how many trials run at once). The MLflow plugin is off
# (HARNESS_DISABLE_PLUGINS=mlflow) so that the wall time is the study's own.
set -uo pipefail
study=$1 out=$2 seconds=$3
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# The checkout itself on the path; its gpu_harness.egg-info (carried along, or `pip install -e .`) holds the
# entry points through which the built-in plugins register.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
harness() { python3 -c "import sys; from harness.cli import main; sys.exit(main())" "$@"; }
if [ ! -f data/cifar-10-batches-py/test_batch ]; then
  python3 -c "from plugins._cifar import write_tiny_cifar; write_tiny_cifar('data/cifar-10-batches-py', n_train=20000, n_test=2000)"
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, optuna; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'optuna', optuna.__version__)"
} > "$out/$study-conditions.txt" 2>&1
export HARNESS_DISABLE_PLUGINS=mlflow PYTHONUNBUFFERED=1 COLUMNS=200
start=$(date +%s)
tag=$study${SAMPLER:+-$SAMPLER}${GPUS:+-gpus${GPUS//,/}}   # its own storage, outputs and compile cache per run
file=studies/$study-gpu.yaml
if [ -n "${SAMPLER:-}" ]; then
  file=studies/.$study-$SAMPLER-gpu.yaml   # beside the original: its relative paths stay valid
  sed -E "s/^sampler: .*/sampler: {name: $SAMPLER}/" "studies/$study-gpu.yaml" > "$file"
fi
harness study "$file" --timeout "$seconds" --storage "sqlite:///$out/$tag.db" \
  --output-dir "/tmp/harness-out/$tag" ${GPUS:+--gpus "$GPUS"} ${NTRIALS:+--n-trials "$NTRIALS"} 2>&1 | tee "$out/$tag.log"
echo "study wall time: $(( $(date +%s) - start )) s" | tee -a "$out/$tag.log"
cp "/tmp/harness-out/$tag/trials.csv" "$out/$tag-trials.csv" 2>/dev/null
cp "/tmp/harness-out/$tag/pareto.json" "$out/$tag-pareto.json" 2>/dev/null
true
