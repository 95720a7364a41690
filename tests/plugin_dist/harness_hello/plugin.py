"""A third-party plugin: the ``hello-sgd`` optimizer (plain SGD without momentum) and a ``hello-blobs``
workload, known to the harness only through this distribution's ``harness.plugins`` entry point."""
import torch
from torch import nn

from harness import hookimpl
from harness.space import Float, Technique
from harness.workload import TensorSource, Workload, WorkloadInfo


@hookimpl
def harness_declare_techniques():
    return [Technique(axis="optimizer", name="hello-sgd", space={"lr": Float(1e-4, 1.0, default=0.1, log=True)})]


@hookimpl
def harness_build_optimizer(params, spec):
    return torch.optim.SGD(params, lr=spec.optimizer.params["lr"])


def build(device, seed):  # noqa: ARG001 (device: the builder protocol's; the trial moves the data)
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 2, generator=g) * 4
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 2, generator=g)
    return Workload(name="hello-blobs", model=nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)),
                    train=TensorSource(x[:480], y[:480]), test=TensorSource(x[480:], y[480:]), input_shape=(2,))


@hookimpl
def harness_declare_workloads():
    return [WorkloadInfo(name="hello-blobs", build=build, kinds=("mlp",))]
