#!/usr/bin/env bash
# What a session lent a GPU runs first, as one call of the device tool (about 9 minutes):
#
#     bash benchmarks/cuda_kit.sh                          # here, once: fills .gpu/
#     run(command="bash benchmarks/cuda_check.sh", carry=[".gpu"], timeout_s=590)
#
# On the GPU machine it installs what the image lacks (from .gpu/whl), unpacks static MNIST, and
# runs, each with its own time limit and log under $OUT: the tests marked ``cuda`` (compiled and
# as-written steps agree, no host synchronization, a CUDA graph captures the compiled step,
# faults, importance sampling and AIS compiled), then the training and the importance-sampling
# benchmarks with --device cuda (pyvae compiled and as written beside the hand-written VAE). A
# step that fails does not stop the next; benchmarks/RESULTS.md gets the numbers.
set -u
out=${OUT:-/tmp/pyvae-cuda}
data=/tmp/pyvae-data
mkdir -p "$out" "$data/binarized_mnist"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
for f in .gpu/data/binarized_mnist/*.gz; do
    gunzip -c "$f" > "$data/binarized_mnist/$(basename "$f" .gz)"
done
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYVAE_DATA="$data"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 270 python3 -m pytest -q -p no:cacheprovider -n 0 -m cuda \
    tests/train/test_compile.py tests/train/test_train.py \
    tests/infer/test_importance_compiled.py tests/infer/test_ais.py 2>&1 | tee "$out/tests.log"
timeout 160 python3 benchmarks/train_speed.py --device cuda --batch-sizes 128 --rounds 2 2>&1 \
    | tee "$out/train.log"
timeout 120 python3 benchmarks/eval_speed.py --device cuda --num-points 100 \
    --baseline-points 2 2>&1 | tee "$out/eval.log"
