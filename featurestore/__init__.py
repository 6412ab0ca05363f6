"""featurestore: the Lance store every stage reads and writes. One row per utterance with metadata,
text, embeddings and provenance, plus failures, targets and evaluation tables.

Doors: `featurestore.schema` (the contract: tables, label vocabularies, keys) and `Store`.
"""

from featurestore.store import (
    SchemaVersionMismatch, Store, StoreDamaged, StoreError, StoreNotFound, StoreReadOnly, WriteResult,
)  # fmt: skip

__all__ = [
    "SchemaVersionMismatch", "Store", "StoreDamaged", "StoreError", "StoreNotFound", "StoreReadOnly", "WriteResult",
]  # fmt: skip
