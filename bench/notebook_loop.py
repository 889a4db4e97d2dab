"""The origin notebook's training loop as written, for timing against bnctl.

It keeps everything that decides the notebook's speed and its reported numbers:
a Dataset that hands out one PIL image at a time, per-image ToTensor + Normalize,
DataLoaders at batch 4 with 2 worker processes (started afresh for every pass),
default (non-fused) Adam, one `loss.item()` per step, and four passes per epoch:
train, test loss, train accuracy, test accuracy, all in train mode. The only
departures: the data are bnctl's uint8 arrays rather than torchvision's CIFAR10
class (same in-memory form: HWC uint8 turned into PIL images), and the model is
bnctl's seed_cnn with BN, so both sides train the very same network.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.optim as optim
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bnctl.config import ModelConfig
from bnctl.data import ImageData
from bnctl.models import build_model


class UInt8ImageDataset(Dataset):
    """uint8 images served one PIL image at a time, the way torchvision's CIFAR10 does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.images = x.permute(0, 2, 3, 1).numpy()  # CIFAR10 keeps HWC uint8 in memory
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _accuracy(loader: DataLoader, model: nn.Module) -> float:
    """The notebook's calculate_accuracy: no_grad, but the model stays in train mode."""
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


@torch.inference_mode()
def eval_mode_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean=0.5, std=0.5) -> float:
    """Test accuracy with BN's running statistics (eval mode): the number the notebook should report."""
    model.eval()
    correct = 0
    for i in range(0, len(y), 1000):
        xb = (x[i:i + 1000].float() / 255 - mean) / std
        correct += (model(xb).argmax(1) == y[i:i + 1000]).sum().item()
    model.train()
    return 100.0 * correct / len(y)


def run(data: ImageData, epochs: int, batch_size: int = 4, num_workers: int = 2, seed: int = 0) -> dict:
    """Train as the notebook does; return per-epoch times and its (train-mode) and eval-mode accuracies."""
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = UInt8ImageDataset(data.train_x, data.train_y, transform)
    testset = UInt8ImageDataset(data.test_x, data.test_y, transform)
    trainloader = DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    testloader = DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    net = build_model(ModelConfig(name="seed_cnn", norm="batch"), num_classes=len(data.classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(net.parameters(), lr=0.001)

    epoch_times, train_seconds, rows = [], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        running_loss = 0.0
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        t1 = time.perf_counter()
        train_loss = running_loss / len(trainloader)
        # As written: gradients tracked and BN in train mode, so the test batches move BN's running stats.
        test_loss = 0.0
        for images, labels in testloader:
            test_loss += criterion(net(images), labels).item()
        test_loss /= len(testloader)
        train_acc = _accuracy(trainloader, net)
        test_acc = _accuracy(testloader, net)
        epoch_times.append(time.perf_counter() - t0)
        train_seconds.append(t1 - t0)
        rows.append({"train_loss": train_loss, "test_loss": test_loss, "train_acc": train_acc, "test_acc": test_acc})
    return {
        "epoch_s": epoch_times, "train_s": train_seconds, "train_images": len(trainset),
        "notebook_test_acc": rows[-1]["test_acc"],  # train mode, as the notebook prints it
        "test_acc": eval_mode_accuracy(net, data.test_x, data.test_y),
        "threads": torch.get_num_threads(),
    }
