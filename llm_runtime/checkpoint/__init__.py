"""Checkpoints: layout and manifests, stores (S3 or a shared path), node tars, save/resume, export."""

__all__ = []
