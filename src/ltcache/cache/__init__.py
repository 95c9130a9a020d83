"""The feature cache, schema v1 (docs/reference/cache-schema.md). Its format has one owner, this package: schema,
reader, writer and journal. The only package that imports h5py; torch is imported
only where tensors are made.

CACHE/manifest.json is the commit point: a shard exists once the manifest lists it. A cache is built in a staging
folder beside its target and swapped into place whole (folders.py), so an interrupted or failed extract never damages
an existing cache, and a reader never sees one half-written.

Every file a cache depends on carries a sha256 in the manifest (shards, head.h5, membership.h5), and the manifest
carries one of its own content (`manifest_sha256`), so an edited class-count list is caught too. Every read checks
what it can: the manifest's keys and types, the hashes of the files it reads, shapes against the manifest, labels in
range and agreeing with the class counts, sample indices covering every row once, finite features and head.
"""

from ltcache.cache.reader import FeatureCache, Split
from ltcache.cache.schema import (
    DTYPES,
    HEAD,
    MANIFEST,
    MEMBERSHIP,
    SCHEMA_VERSION,
    TEXT_HEAD,
    check_finite,
    check_head_arrays,
    check_manifest,
)
from ltcache.cache.writer import CacheWriter, SplitWriter, check_writer_options

__all__ = ["DTYPES", "HEAD", "MANIFEST", "MEMBERSHIP", "SCHEMA_VERSION", "TEXT_HEAD", "CacheWriter", "FeatureCache",
           "Split", "SplitWriter", "check_finite", "check_head_arrays", "check_manifest", "check_writer_options"]
