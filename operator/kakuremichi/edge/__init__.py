"""The edges (gateway and agent): thin I/O shells around the pure planning modules."""
