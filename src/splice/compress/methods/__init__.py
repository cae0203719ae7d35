"""One file per compression method; each registers itself with `splice.compress.registry.register`."""
