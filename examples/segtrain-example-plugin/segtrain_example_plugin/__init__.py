"""An example segtrain plugin package (see models.py)."""
