"""The control plane: reconcilers for the four resources, the SQLite mirror, the control
channel. Thin shells around the pure modules of the package."""
