"""Your own model, trained and measured by gpu-harness with no plugin: name it ``workload: my_model:build``.

A 2-layer Transformer encoder classifies token sequences by which of four marker tokens occurs most often.
"""
import torch
from torch import nn

from harness.workload import TensorSource, Workload


class Classifier(nn.Module):
    """Token embeddings, a Transformer encoder, mean pooling over the sequence, a linear head."""

    def __init__(self, vocab: int, classes: int, width: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def make_data(samples: int, seq_len: int, vocab: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; the label is the marker token (0 .. classes-1) that occurs most often."""
    generator = torch.Generator().manual_seed(0)  # the same data in every trial
    tokens = torch.randint(0, vocab, (samples, seq_len), generator=generator)
    counts = torch.stack([(tokens == c).sum(dim=1) for c in range(classes)], dim=1)
    return tokens, counts.argmax(dim=1)


def build(device, seed, samples=4096, seq_len=16, width=32, layers=2):  # noqa: ARG001 (the harness moves it)
    """Called in each trial's process as ``build(device=..., seed=..., **params)`` (``params``: the workload's
    parameters from the trial or study file). Data and model may stay on the CPU: the harness moves them."""
    tokens, labels = make_data(samples, seq_len, vocab=8, classes=4)
    torch.manual_seed(seed)  # the trial's seed initialises the model
    model = Classifier(vocab=8, classes=4, width=width, layers=layers)
    split = samples * 4 // 5  # 4/5 to train on, 1/5 held out for accuracy and val_loss
    return Workload(name="my-model", model=model, input_shape=(seq_len,),
                    train=TensorSource(tokens[:split], labels[:split]),
                    test=TensorSource(tokens[split:], labels[split:]))
