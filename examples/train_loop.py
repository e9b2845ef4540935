"""A RefineNet training loop written out by hand (what `python -m tinyrefine train` does for you).

    python examples/train_loop.py      # 35 s on a 2-core CPU (300 iterations; measured 28 Nov, 2 min at an earlier stop)

It trains a small RefineNet on the synthetic Shapes set (no download needed) for 300 iterations, five
epochs of 62 batches, and prints the validation mIoU. The loop restarts the loader at the end of each
epoch; `zip(range(300), loader)` would stop after the first epoch's 62 batches. The model starts with
its decoder's residual branches at zero and the learning rate warms up linearly over the first 30
iterations, as the trainer does by default: without them the first Adam steps of an untrained RefineNet
can blow the loss up by orders of magnitude.
"""
import time

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.data import DataLoader, Shapes, eval_transform, train_transform
from tinyrefine.metrics import RunningConfusion
from tinyrefine.models import RefineNet
from tinyrefine.optim import Adam, PolyLR

ITERS, WARMUP = 300, 30
tr.retain_freed_memory()   # as the CLI does: glibc keeps what a step frees for the next step (README, CPU)
device = "cuda" if tr.cuda_available() else "cpu"
train_set, val_set = Shapes("train"), Shapes("val")
loader = DataLoader(train_set, batch_size=8, shuffle=True, seed=0, drop_last=True,
                    transform=train_transform(64), device=device)
model = RefineNet(train_set.num_classes, "resnet18", encoder_width=16, features=32, n_crp=2, freeze_bn=False,
                  zero_init_residual=True).to(device)   # each RCU / CRP branch starts as an identity
optimizer = Adam(model.parameters(), lr=3e-3)
schedule = PolyLR(optimizer, max_iter=ITERS, warmup=WARMUP)  # linear warm-up, then poly decay


def batches(loader):
    """Batches forever: epoch 0, epoch 1, ... (each epoch reshuffled from (seed, epoch))."""
    epoch = 0
    while True:
        yield from loader.iter_from(epoch, 0)
        epoch += 1


start = time.perf_counter()
model.train()
for iteration, (images, masks) in zip(range(ITERS), batches(loader)):
    schedule.step(iteration)
    loss = F.cross_entropy(model(tr.Tensor(images)), masks, ignore_index=255)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if iteration % 50 == 0 or iteration == ITERS - 1:
        print(f"iteration {iteration:4d}  epoch {loader.epoch}  loss {loss.item():.4f}  "
              f"lr {optimizer.param_groups[0]['lr']:.2e}")
print(f"trained {ITERS} iterations in {time.perf_counter() - start:.0f} s on {device}")

model.eval()
confusion = RunningConfusion(train_set.num_classes)
with tr.no_grad():
    for images, masks in DataLoader(val_set, batch_size=10, transform=eval_transform(), device=device):
        confusion.update(model(tr.Tensor(images)).data.argmax(axis=1), masks)
metrics = confusion.compute()
print(f"val mIoU {metrics['mean_iou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}  "
      f"IoU per class {dict(zip(train_set.classes, metrics['iou'].round(3)))}")
