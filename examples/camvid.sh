#!/usr/bin/env bash
# RefineNet-ResNet-18 from scratch on camvid-mini (123 train / 51 val frames), then the evaluation with
# multi-scale + flip and one segmented frame. Add --device cuda to the train line on a GPU (not measured).
#
#   bash examples/camvid.sh            # small: width 32, decoder 64, 192² crops, 1400 iterations: about 60 min
#   ITERS=500 bash examples/camvid.sh  # the same for 500 iterations: about 23 min
#   bash examples/camvid.sh full       # width 64, decoder 256, 224² crops, 1500 iterations: about 9 hours
#
# Estimates for one BLAS thread (what the automatic thread count picks on a busy machine; README: Threads)
# on a 2-core AMD EPYC shared with other jobs (load 1.4-2.5): s/iteration
# measured over 15 (small) and 3 (full) iterations (2.35 and 21.9 s) times the iterations, plus the
# evaluations at 0.42 s/image (2.2 with 3 scales + flip). The small run's sizes are the README's camvid-mini
# row (val mIoU 0.334 there, measured before the warm-up and zero-init defaults). The run prints its own
# estimate after 20 iterations.
set -euo pipefail
DATA=${TINYREFINE_DATA:-../shared/data}/camvid-mini
if [ "${1:-}" = full ]; then
    OUT=runs/camvid_full
    python -m tinyrefine train --data camvid:$DATA --encoder resnet18 --crop 224 --batch-size 4 \
        --iters 1500 --optimizer adam --lr 1e-3 --encoder-lr 1e-3 --weight-decay 0 --no-freeze-bn \
        --eval-every 250 --eval-limit 20 --eval-size 240 --out $OUT
else
    OUT=runs/camvid
    python -m tinyrefine train --data camvid:$DATA --encoder resnet18 --encoder-width 32 --features 64 \
        --crop 192 --batch-size 4 --iters ${ITERS:-1400} --optimizer adam --lr 2e-3 --encoder-lr 2e-3 --weight-decay 0 \
        --no-freeze-bn --eval-every 200 --eval-limit 20 --eval-size 240 --out $OUT
fi
python -m tinyrefine evaluate --checkpoint $OUT/checkpoint.npz --eval-size 240 --scales 0.75,1,1.25 --flip
python -m tinyrefine predict --checkpoint $OUT/checkpoint.npz "$DATA/images/$(head -1 $DATA/splits/val.txt).jpg" \
    --out $OUT/predictions
