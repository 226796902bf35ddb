"""fedckpt's Flower App: FedAvg on synthetic data, with checkpoints that resume the run after a crash."""
