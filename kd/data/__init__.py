"""Training data: records -> two aligned views -> batches.

records.py  read files / datasets, the record schema, column mapping
views.py    chat rendering of the teacher and student views (every assistant turn a target),
            erasure, length policy, tokenising
store.py    tokenise once: the views on disk under a fingerprint, memory-mapped by every rank
batches.py  collate (padded, or packed into one row per view), the resumable (length-grouped) sampler
"""

from kd.data.batches import (MicroBatchSampler, collate, collate_packed, eval_batches, example_lengths,
                             real_tokens, tokens_in, train_loader)
from kd.data.records import load_records
from kd.data.views import (DataStats, build_datasets, conversation_rows, erase_coin, example_from_views,
                           fit_length, render_views, tokenize_dataset)

__all__ = ["DataStats", "MicroBatchSampler", "build_datasets", "collate", "collate_packed", "example_lengths",
           "real_tokens", "tokens_in", "conversation_rows", "erase_coin",
           "eval_batches", "example_from_views", "fit_length", "load_records", "render_views", "tokenize_dataset",
           "train_loader"]
