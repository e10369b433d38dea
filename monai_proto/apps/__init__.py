from .bundle import default_bundle_root
