"""The rmsprop_jax benchmark suite: ``python -m benchmarks.run`` (``make bench``)."""
