"""Training the heads on cached CLIP features.

caching.py (cache_features: the feature cache), training.py (train_head: one task's head),
metrics.py (the paper's scores), data.py and features.py (the formats read and written);
cache_features.py and train_head.py are the commands' parsers and mains.
"""
