#!/usr/bin/env bash
# Packs, on this machine, what benchmarks/cuda_check.sh needs on a GPU machine that reaches no
# network: the wheels of pyvae's needs that the GPU machine's image lacks (pyro-ppl, arviz and
# theirs; its image has torch, numpy, xarray, matplotlib, scikit-learn, tensorboard, pytest) and
# static binarized MNIST, gzipped (its .amat files are 105 MB, more than a device call carries).
# Into .gpu/ (ignored by git), about 7 MB.
#
#     bash benchmarks/cuda_kit.sh          # data from $PYVAE_DATA, else ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
data=${PYVAE_DATA:-../shared/data}
rm -rf .gpu
mkdir -p .gpu/whl .gpu/data/binarized_mnist
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 \
    h5netcdf==1.8.3 platformdirs==4.14.9
for f in "$data"/binarized_mnist/binarized_mnist_*.amat; do
    gzip -c "$f" > ".gpu/data/binarized_mnist/$(basename "$f").gz"
done
du -sh .gpu
