"""The demo model must learn the demo data: `prunekit run` relies on it."""
import torch
import torch.nn.functional as F

from prunekit.data import DataConfig, load_data
from prunekit.models import create_model


def test_small_cnn_reaches_90_percent_val_accuracy_on_digits_in_three_epochs():
    torch.manual_seed(0)
    bundle = load_data(DataConfig(name="digits", batch_size=64, seed=0))
    model = create_model("small_cnn", num_classes=bundle.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        bundle.train.set_epoch(epoch)
        model.train()
        for x, y in bundle.train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in bundle.val)
    assert bundle.val.num_samples == 144
    assert correct / bundle.val.num_samples > 0.90
