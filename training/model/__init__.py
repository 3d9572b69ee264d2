"""Base models behind the ``Backend`` interface: diffusers backends, single-file loading, layer names."""
