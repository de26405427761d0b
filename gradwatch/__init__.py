"""Watch a PyTorch model's weights and gradients while it trains: histograms that never crash on
NaN, per-layer statistics and a written diagnosis, all in TensorBoard.

    from gradwatch import TrainingMonitor

    with TrainingMonitor("Result/my-run").watch(model, optimizer) as monitor:
        for epoch in range(epochs):
            for inputs, labels in loader:
                ...                    # zero_grad, forward, backward, optimizer.step()
                monitor.step()         # before the next zero_grad()
            findings = monitor.epoch_end(epoch, {"valid/accuracy": accuracy})
"""

from .diagnosis import Finding, Thresholds, diagnose
from .histograms import Histogram, compute_histograms
from .monitor import TrainingMonitor, is_main_process
from .pictures import confusion_matrix_image, gradient_flow_image
from .stats import gradient_flow, parameter_statistics

__version__ = "0.1.0"
