"""LISA training (``train_ds.py``): modes lisa / decoder / full, data, checkpoints, decoder cache."""
