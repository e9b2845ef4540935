#!/usr/bin/env bash
# Train RefineNet-ResNet-18 from scratch on camvid-mini, then evaluate with multi-scale + flip and
# segment one frame. About 30 minutes on 2 CPU cores; add --device cuda on a GPU.
set -euo pipefail
DATA=${TINYREFINE_DATA:-../shared/data}/camvid-mini
python -m tinyrefine train --data camvid:$DATA --encoder resnet18 --crop 224 --batch-size 4 \
    --iters 1500 --optimizer adam --lr 1e-3 --encoder-lr 1e-3 --weight-decay 0 --no-freeze-bn \
    --eval-every 250 --eval-size 240 --out runs/camvid
python -m tinyrefine evaluate --checkpoint runs/camvid/checkpoint.npz --eval-size 240 --scales 0.75,1,1.25 --flip
python -m tinyrefine predict --checkpoint runs/camvid/checkpoint.npz "$DATA/images/$(head -1 $DATA/splits/val.txt).jpg" --out runs/camvid/predictions
