"""peftcore for JAX parameter trees (pure functions: jit, grad, vmap, sharding).

Not built yet: this package is reserved for the JAX backend (tracked as its own
issue). It will apply adapters to pytrees by module path and call ``peftcore``
for every piece of math.
"""

__all__: list[str] = []
