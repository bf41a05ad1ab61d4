#!/usr/bin/env bash
# Issue 11 on a device machine, in one call. Prepare here (POT is the one dependency the image lacks; the data
# cannot be downloaded there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl POT==0.9.5
#   mkdir -p data/fashion_mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion_mnist/
# then run there, carrying .whl and data:   bash scripts/gpu_session.sh
#
# 1. POT from the carried wheel into /tmp/site; the package runs from the source tree (python3 -m otbr_plugin.cli)
# 2. benchmarks/throughput.py, preactresnet18 width $WIDTH on 1x28x28 and 3x32x32, fp32 and bf16 ($PRECISIONS)
# 3. the full-width grid (configs/bench/fashion_mnist_full.yaml), one process per seed ($SEEDS) sharing the GPU,
#    each stopped after $GRID_MINUTES minutes (a stopped grid resumes where it stopped, records are atomic)
# 4. with CIFAR=1: the CIFAR-10 grid on a synthetic CIFAR-10 at full width, $CIFAR_EPOCHS epochs
# Back in $OUT (at most 8 files): session.log, throughput_<precision>.json, table.md, report.html, results.tar.gz
# (records, tables and logs of every grid; no bundles).
set -uo pipefail
OUT=${OUT:-runs/gpu_session}
WIDTH=${WIDTH:-1.0}
STEPS=${STEPS:-50}
PRECISIONS=${PRECISIONS-fp32 bf16}     # empty: no benchmark
SEEDS=${SEEDS:-0 1 2}
GRID_MINUTES=${GRID_MINUTES:-6}
GRID_SET=${GRID_SET:-}          # extra --set for the grid, e.g. "attack_overrides.train.epochs=1" for a dry run
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-}   # extra benchmark arguments, e.g. "--compile" or "--eval-images 2000"
CIFAR=${CIFAR:-0}
CIFAR_EPOCHS=${CIFAR_EPOCHS:-5}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 OTBR_OFFLINE=1 OTBR_DATA="$PWD/data"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
BENCH=(python3 -m otbr_plugin.cli)
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import torch, ot; print('torch', torch.__version__, 'POT', ot.__version__, 'accelerator',
torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None)" || exit 1
date -u +"start %FT%TZ"

for p in $PRECISIONS; do
  timeout 300 python3 benchmarks/throughput.py --device auto --width "$WIDTH" --steps "$STEPS" --precision "$p" \
    --json "$OUT/throughput_$p.json" $THROUGHPUT_ARGS
done

sets=(); [ -n "$GRID_SET" ] && for s in $GRID_SET; do sets+=(--set "$s"); done
start=$(date +%s)
pids=()
for s in $SEEDS; do
  mkdir -p runs/fashion_mnist_full/seed$s
  timeout "${GRID_MINUTES}m" "${BENCH[@]}" bench configs/bench/fashion_mnist_full.yaml --set "seeds=[$s]" "${sets[@]}" \
    --out runs/fashion_mnist_full/seed$s --bundles runs/fashion_mnist_full_bundles/seed$s --no-progress --no-report \
    > runs/fashion_mnist_full/seed$s/grid.log 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"  # these pids only: a bare wait would also wait for the tee above, forever
echo "grid wall time: $(( $(date +%s) - start )) s (seeds $SEEDS in parallel)"
for s in $SEEDS; do tail -n 3 runs/fashion_mnist_full/seed$s/grid.log; done
"${BENCH[@]}" table runs/fashion_mnist_full | tee "$OUT/table.md"
"${BENCH[@]}" report runs/fashion_mnist_full --out "$OUT/report.html"

if [ "$CIFAR" = 1 ]; then
  python3 scripts/synthetic_cifar10.py --root data/synthetic --overwrite
  timeout 300 "${BENCH[@]}" bench configs/bench/cifar10.yaml --out runs/cifar10_synthetic --set data_root=data/synthetic \
    --set "attack_overrides.train.epochs=$CIFAR_EPOCHS" --no-progress --no-report > runs/cifar10_synthetic.log 2>&1
  tail -n 30 runs/cifar10_synthetic.log
fi
tar czf "$OUT/results.tar.gz" --exclude='*/bundles' runs/fashion_mnist_full $( [ "$CIFAR" = 1 ] && echo runs/cifar10_synthetic runs/cifar10_synthetic.log )
date -u +"end %FT%TZ"
