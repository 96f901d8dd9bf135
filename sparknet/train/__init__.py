"""Training: a driver-side launcher (launcher.py) starts one barrier task per rank;
each task (worker.py) joins torch.distributed and trains on its Petastorm share (data.py)."""
