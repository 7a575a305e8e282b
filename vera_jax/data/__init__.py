"""Benchmark data readers (tfds data_source or local files) and bucketed padding for the trainer."""

from . import images
from .batching import bucket_for, bucket_lengths, pad_rows, padding_fraction
from .common import DataUnavailableError, reachable
from .glue import (
    TASKS,
    GlueDataError,
    GlueTask,
    Split,
    get_task,
    load_split,
    read_local,
    read_tfds,
    read_tsv,
    tokenize,
)
from .images import ImageData, ImageDataError, ImageProcessing

__all__ = [
    "TASKS", "DataUnavailableError", "GlueDataError", "GlueTask", "Split", "bucket_for", "bucket_lengths",
    "get_task", "load_split", "pad_rows", "padding_fraction", "reachable", "read_local",
    "read_tfds", "read_tsv", "tokenize", "images", "ImageData", "ImageDataError", "ImageProcessing",
]
