"""Machine-learning adapters: PyTorch models, dataset loaders and partitioners."""
