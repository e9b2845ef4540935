#!/usr/bin/env bash
# RefineNet from scratch on voc-small (333 train / 254 val real PASCAL VOC 2012 pairs) on a CPU, then the
# full-size evaluation with the per-class IoU table. Measured: see the README's "Training on VOC" section.
#
#   bash examples/voc.sh            # the recipe, 1500 iterations: 86 min of wall time for the training,
#                                   #   measured on a busy 2-core AMD EPYC (one BLAS thread, load 3-10);
#                                   #   about 55 min at the 2.2 s/iteration of a quiet core (estimate)
#   ITERS=300 bash examples/voc.sh  # a shorter look, about 20 min with its evaluations (estimate: 300 x 2.2-2.6
#                                   #   s/iteration + ~700 images scored at the 0.77 s/image of the measured run);
#                                   #   it learns the background only (see the README)
set -euo pipefail
DATA=${TINYREFINE_DATA:-../shared/data}/voc-small
ITERS=${ITERS:-1500}
# One BLAS thread: on a 2-core machine that is busy with anything else, more threads only fight.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
python -m tinyrefine train --data voc:$DATA --encoder resnet18 --encoder-width 32 --features 64 \
    --crop 192 --batch-size 4 --scale-min 0.5 --scale-max 2.0 --no-freeze-bn \
    --optimizer adam --lr 5e-4 --encoder-lr 5e-4 --weight-decay 0 --warmup-iters 100 \
    --iters $ITERS --eval-every 250 --eval-limit 50 --eval-size 256 --checkpoint-every 50 --out runs/voc
python -m tinyrefine evaluate --checkpoint runs/voc/checkpoint.npz --eval-size 256
