#!/usr/bin/env bash
# RefineNet at the paper's widths (ResNet-50 encoder at width 64, decoder 256) on voc-small, on one GPU.
# NOT MEASURED: no GPU has been lent to this project yet. The progress bar shows the time per iteration
# and the ETA after a few steps; lower --iters if it would run past your budget (aim: ~10 minutes).
#
#   bash examples/voc_gpu.sh                  # from scratch, the CPU recipe's fixes (zero-init, warm-up)
#   bash examples/voc_gpu.sh pretrained       # ImageNet encoder from torchvision (downloads 98 MB once)
set -euo pipefail
DATA=${TINYREFINE_DATA:-../shared/data}/voc-small
COMMON=(--data voc:$DATA --encoder resnet50 --encoder-width 64 --features 256 --n-crp 4 --crop 320
        --batch-size 8 --device cuda --eval-every 200 --eval-limit 50 --eval-size 320)
if [ "${1:-}" = pretrained ]; then
    # torchvision's ImageNet ResNet-50 (IMAGENET1K_V1); read without torch by tinyrefine.io
    WEIGHTS=runs/resnet50-0676ba61.pth
    mkdir -p runs
    [ -f $WEIGHTS ] || curl -L -o $WEIGHTS https://download.pytorch.org/models/resnet50-0676ba61.pth
    # the paper's recipe for a pretrained encoder: SGD, frozen BN, the encoder at a tenth of the LR
    python -m tinyrefine train "${COMMON[@]}" --pretrained $WEIGHTS --iters 1000 --optimizer sgd --lr 1e-2 \
        --weight-decay 1e-4 --out runs/voc_gpu_pretrained
else
    python -m tinyrefine train "${COMMON[@]}" --iters 1000 --optimizer adam --lr 1e-3 --encoder-lr 1e-3 \
        --weight-decay 0 --no-freeze-bn --warmup-iters 100 --out runs/voc_gpu
fi
