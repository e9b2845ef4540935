"""A RefineNet training loop written out by hand (what `python -m tinyrefine train` does for you).

    python examples/train_loop.py            # a couple of minutes on a CPU
"""
import numpy as np

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.data import DataLoader, Shapes, train_transform
from tinyrefine.metrics import RunningConfusion
from tinyrefine.models import RefineNet
from tinyrefine.optim import Adam, PolyLR

device = "cuda" if tr.cuda_available() else "cpu"
train_set, val_set = Shapes("train"), Shapes("val")
loader = DataLoader(train_set, batch_size=8, shuffle=True, seed=0, drop_last=True,
                    transform=train_transform(64), device=device)
model = RefineNet(train_set.num_classes, "resnet18", encoder_width=16, features=32, n_crp=2,
                  freeze_bn=False).to(device)
optimizer = Adam(model.parameters(), lr=3e-3)
schedule = PolyLR(optimizer, max_iter=300)

model.train()
for iteration, (images, masks) in zip(range(300), loader):
    schedule.step(iteration)
    loss = F.cross_entropy(model(tr.Tensor(images)), masks, ignore_index=255)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if iteration % 50 == 0:
        print(f"iteration {iteration:4d}  loss {loss.item():.4f}")

model.eval()
confusion = RunningConfusion(train_set.num_classes)
with tr.no_grad():
    for images, masks in DataLoader(val_set, batch_size=10, transform=train_transform(64, scale=(1, 1)), device=device):
        confusion.update(model(tr.Tensor(images)).data.argmax(axis=1), masks)
print("val mIoU", round(confusion.compute()["mean_iou"], 4))
