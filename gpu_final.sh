#!/usr/bin/env bash
# One-off lead verification on the lent GPU (not committed).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 || exit
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_techniques.py -k cuda_graph_step -rA 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
export HARNESS_DISABLE_PLUGINS=mlflow
date -u > $OUT/study_time.txt
( time timeout 420 harness study studies/gpt-gpu.yaml --timeout 250 --storage sqlite:////tmp/g.db --output-dir $OUT/gpt-study ) 2>&1 | tail -60 | tee $OUT/gpt_study.txt
date -u >> $OUT/study_time.txt
rm -f $OUT/gpt-study/*.png
