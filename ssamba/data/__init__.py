"""Data: manifests, importers of published layouts, feature cache, datasets, the demo corpus."""
