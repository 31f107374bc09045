"""Paper-reproduction experiments; each module runs alone (``python experiments/NAME.py``)."""
