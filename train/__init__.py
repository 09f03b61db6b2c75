"""Training scripts, one per use case (run them as ``python3 train/train_c.py CONFIG``)."""
