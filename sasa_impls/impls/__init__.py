"""One module per implementation; each registers itself with ``sasa_impls.registry.register``."""
