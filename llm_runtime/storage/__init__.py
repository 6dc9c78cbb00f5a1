"""One object-store interface beneath data and checkpoints: S3 (boto3) or a file system.

``open_store(uri)`` gives an :class:`~.s3.S3Store` for ``s3://bucket/prefix`` or a
:class:`~.files.FileStore` for a directory (local disk, FSx for Lustre, EFS). Both offer

- ``read_text`` / ``read_bytes`` / ``open_range`` (sequential ranged reads; S3 resumes a cut body
  from the byte reached, pinned to the ETag) / ``download`` / ``size`` / ``list``;
- ``write_text`` / ``write_file`` / ``move_file`` / ``write_stream`` (multipart on S3);
- ``delete(names, first=...)`` (batch deletes; ``first`` in a request of its own);
- ``probe()`` (a missing bucket, an unreachable endpoint or no credentials: one line, in seconds);
- ``child(prefix)`` and ``stats`` (requests on the wire by method, bytes, retries).

Every failure is a :class:`StorageError` naming the object; its ``kind`` says whether it was
transient (retried until the attempts ran out), missing, changed or permanent. No module of the
runtime outside this package imports boto3 or botocore.
"""
from .base import RequestStats, join, open_store, parse_s3_uri
from .errors import ObjectChanged, ObjectMissing, StorageError, describe, kind_of

__all__ = ["ObjectChanged", "ObjectMissing", "RequestStats", "StorageError", "describe", "join", "kind_of",
           "open_store", "parse_s3_uri"]
