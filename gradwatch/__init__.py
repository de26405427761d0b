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

import importlib

__version__ = "0.1.0"

# What `from gradwatch import X` gives, and the module that holds it: imported at first use, so that
# the `diagnose` command, which needs no torch, starts at once (and Ctrl-C while it starts is quiet)
_EXPORTS = {
    "Finding": "diagnosis",
    "Thresholds": "diagnosis",
    "diagnose": "diagnosis",
    "Histogram": "histograms",
    "compute_histograms": "histograms",
    "TrainingMonitor": "monitor",
    "is_main_process": "monitor",
    "confusion_matrix_image": "pictures",
    "gradient_flow_image": "pictures",
    "gradient_flow": "stats",
    "parameter_statistics": "stats",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradwatch' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
