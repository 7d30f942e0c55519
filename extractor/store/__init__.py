"""The HDF5 feature store: the one owner of the feature-file schema, its writer, reader, checks and merge.

Rooms: ``schema`` (layout, fields, bounds, ImageFeatures, errors, attributes), ``writer`` (FeatureWriter
and its crash protocol), ``reader`` (safe opening, FeatureReader), ``validation``, ``merging``, ``tsv``
(LXMERT / Caffe TSV in and out), ``blocks`` (the memory budget of streaming) and ``h5file`` (HDF5 writes
under OS errors). The public API is imported here: ``from extractor.store import FeatureReader``.
"""
from extractor.store.merging import merge
from extractor.store.reader import FeatureReader
from extractor.store.schema import (
    BOX_TOLERANCE,
    FEATURE_DTYPES,
    FIELDS,
    MAX_BOXES,
    MAX_FEATURE_DIM,
    MAX_IMAGE_BYTES,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    FeatureStoreError,
    ImageFeatures,
    failures_path,
    img_id_problem,
    parts_dir,
)
from extractor.store.validation import validate
from extractor.store.writer import FeatureWriter, remove_stale_parts

__all__ = ["BOX_TOLERANCE", "FEATURE_DTYPES", "FIELDS", "MAX_BOXES", "MAX_FEATURE_DIM", "MAX_IMAGE_BYTES",
           "REQUIRED_ATTRS", "SCHEMA_VERSION", "FeatureReader", "FeatureStoreError", "FeatureWriter",
           "ImageFeatures", "failures_path", "img_id_problem", "merge", "parts_dir", "remove_stale_parts",
           "validate"]
