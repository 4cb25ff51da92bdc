"""Training data: records -> two aligned views -> batches.

records.py  read files / datasets, the record schema, column mapping
views.py    chat rendering of the teacher and student views, erasure, length policy, tokenising
batches.py  collate (padding, aligned response indices), the resumable micro-batch sampler
"""

from kd.data.batches import MicroBatchSampler, collate, eval_batches, train_loader
from kd.data.records import load_records
from kd.data.views import DataStats, build_datasets, erase_coin, fit_length, render_views, tokenize_dataset

__all__ = ["DataStats", "MicroBatchSampler", "build_datasets", "collate", "erase_coin", "eval_batches", "fit_length",
           "load_records", "render_views", "tokenize_dataset", "train_loader"]
