"""The contract between the preprocessing job, the store, training and evaluation.

One module declares every table, the label vocabularies and the key format, and validates rows at
the store's door. Embeddings are real Arrow `fixed_size_list<float32>` (Lance can vector-index those;
Ray's tensor extension type it cannot). The integer label ids exist because `lance.torch` cannot
yield strings. Bump `SCHEMA_VERSION` on any change that old readers would misread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1
META_VERSION = b"merg.schema_version"
META_TABLE = b"merg.table"
META_EMBEDDING_DIM = b"merg.embedding_dim"
META_FUSED_DIM = b"merg.fused_dim"

# Order fixes the integer ids; never reorder, only append (and bump SCHEMA_VERSION).
EMOTIONS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")
EMOTION_ID = {name: i for i, name in enumerate(EMOTIONS)}
SENTIMENT_ID = {name: i for i, name in enumerate(SENTIMENTS)}

SPLITS: tuple[str, ...] = ("train", "dev", "test")
KEY_PATTERN = r"^(train|dev|test)/dia[0-9]+_utt[0-9]+$"
EMBEDDING_COLUMNS = ("audio_emb", "vision_emb", "fused_emb")

# Lance's merge_insert refuses to let two concurrent writers both insert the same new key only when
# the key is declared an (unenforced) primary key: without it, racing upserts duplicate rows.
PRIMARY_KEY = "lance-schema:unenforced-primary-key"
_PK = {PRIMARY_KEY.encode(): b"true"}

UTTERANCES = "utterances"
FAILURES = "failures"
TARGETS = "targets"
EVAL_OUTPUTS = "eval_outputs"
EVAL_RESULTS = "eval_results"
SWEEP_CELLS = "sweep_cells"
CELL_PROGRESS = "cell_progress"
PROBE_RESULTS = "probe_results"
TARGET_KINDS: tuple[str, ...] = ("next_utterance", "teacher")


def utterance_key(split: str, dialogue_id: int, utterance_id: int) -> str:
    """The one key format used everywhere: `split/diaD_uttU` (store rows, logs, artifact names)."""
    return f"{split}/dia{dialogue_id}_utt{utterance_id}"


def _vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def utterances_schema(embedding_dim: int, fused_dim: int | None = None) -> pa.Schema:
    """One row per MELD utterance. `fused_dim` differs from `embedding_dim` for `concat` fusion."""
    fused_dim = fused_dim or embedding_dim
    fields = [
        pa.field("key", pa.string(), nullable=False, metadata=_PK),
        # MELD metadata and text
        pa.field("split", pa.string()),
        pa.field("dialogue_id", pa.int32()),
        pa.field("utterance_id", pa.int32()),
        pa.field("speaker", pa.string()),
        pa.field("text", pa.string()),
        pa.field("emotion", pa.string()),
        pa.field("emotion_id", pa.int32()),
        pa.field("sentiment", pa.string()),
        pa.field("sentiment_id", pa.int32()),
        pa.field("season", pa.int32()),
        pa.field("episode", pa.int32()),
        pa.field("start_time", pa.string()),
        pa.field("end_time", pa.string()),
        # the clip
        pa.field("clip_path", pa.string()),
        pa.field("clip_sha256", pa.string()),
        pa.field("duration", pa.float32()),
        pa.field("fps", pa.float32()),
        pa.field("has_audio", pa.bool_()),
        # active speaker detection
        pa.field("face_visible", pa.bool_()),
        pa.field("asd_score", pa.float32()),
        pa.field("asd_method", pa.string()),
        pa.field("speaker_box", pa.list_(pa.float32(), 4)),  # median (x0, y0, x1, y1), frame-relative
        pa.field("speaker_track_frames", pa.int32()),
        # embeddings (each modality L2-normalised, plus the fused vector)
        pa.field("audio_emb", _vector(embedding_dim)),
        pa.field("vision_emb", _vector(embedding_dim)),
        pa.field("fused_emb", _vector(fused_dim)),
        # provenance
        pa.field("encoder", pa.string()),
        pa.field("encoder_checkpoint", pa.string()),  # sha256 of the checkpoint, or "random-init:<seed>"
        pa.field("fusion", pa.string()),
        pa.field("pipeline_version", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(
        fields,
        metadata={
            META_VERSION: str(SCHEMA_VERSION).encode(),
            META_TABLE: UTTERANCES.encode(),
            META_EMBEDDING_DIM: str(embedding_dim).encode(),
            META_FUSED_DIM: str(fused_dim).encode(),
        },
    )


FAILURES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False, metadata=_PK),
        pa.field("stage", pa.string(), nullable=False, metadata=_PK),  # "read" | "decode" | "asd" | "encode" | "store" | ...
        pa.field("reason", pa.string()),  # machine-readable, e.g. "truncated", "embedding_width"
        pa.field("detail", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("last_seen", pa.timestamp("us", tz="UTC")),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: FAILURES.encode()},
)


# One training/evaluation example per (kind, utterance): the dialogue up to `key`, who speaks next,
# and the reply to learn. `key` is the utterance whose audio/video goes with the prompt.
TARGETS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata=_PK),  # "<kind>:<key>"
        pa.field("kind", pa.string(), nullable=False),  # one of TARGET_KINDS
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("dialogue_id", pa.int32()),
        pa.field("utterance_id", pa.int32()),
        pa.field("history", pa.list_(pa.string())),  # "Speaker: text" lines, oldest first, ending at `key`
        pa.field("next_key", pa.string()),
        pa.field("next_speaker", pa.string()),
        pa.field("next_emotion", pa.string()),
        pa.field("next_sentiment", pa.string()),
        pa.field("target", pa.string()),
        pa.field("source", pa.string()),  # "meld", or the teacher model and its decoding settings (JSON)
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: TARGETS.encode()},
)

# One row per (evaluation cell, example): the reply and its per-example scores.
EVAL_OUTPUTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata=_PK),  # "<cell>:<key>"
        pa.field("cell", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("history", pa.list_(pa.string())),
        pa.field("next_speaker", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("reply", pa.string()),
        pa.field("next_emotion", pa.string()),
        pa.field("reply_emotion", pa.string()),  # the emotion backend's top label for the reply
        pa.field("reference_emotion", pa.string()),
        pa.field("nll", pa.float64()),  # summed NLL of the gold reply given the prompt
        pa.field("tokens", pa.int32()),
        pa.field("bertscore_f1", pa.float64()),
        pa.field("emotion_alignment", pa.float64()),
        pa.field("sentiment_alignment", pa.float64()),
        pa.field("emotion_alignment_history", pa.float64()),
        pa.field("sentiment_alignment_history", pa.float64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        # what the cell's aggregates need besides the above, so they are computed from the stored rows
        # alone (a cell streams its rows in chunks and may finish in another process); appended to
        # older tables as nulls on their first write
        pa.field("bertscore_p", pa.float64()),
        pa.field("bertscore_r", pa.float64()),
        pa.field("self_nll", pa.float64()),  # the reply's first sentence without context (ref_self_ppl)
        pa.field("self_tokens", pa.int32()),
        pa.field("uncond_nll", pa.float64()),  # the gold reply without context (ref_uncond_ppl)
        pa.field("uncond_tokens", pa.int32()),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: EVAL_OUTPUTS.encode()},
)

# One row per evaluation cell (system x decoding preset x split): status, aggregates, provenance.
EVAL_RESULTS_SCHEMA = pa.schema(
    [
        pa.field("cell", pa.string(), nullable=False, metadata=_PK),  # hash of everything that determines the numbers
        pa.field("sweep", pa.string()),
        pa.field("system", pa.string()),
        pa.field("model", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("run", pa.string()),  # the trained run folder, or null for a pretrained model
        pa.field("preset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("target", pa.string()),
        pa.field("status", pa.string()),  # "done" | "failed"
        pa.field("error", pa.string()),
        pa.field("examples", pa.int32()),
        pa.field("metrics", pa.string()),  # JSON: every aggregate with its 95% interval, and descriptions
        pa.field("notes", pa.string()),  # e.g. stand-in models, random-init encoders
        pa.field("config_hash", pa.string()),
        pa.field("store_version", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("node", pa.string()),  # where the cell ran: host, and the Ray node id on a cluster
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: EVAL_RESULTS.encode()},
)

# Which cells make up a sweep: a cell is shared by every sweep whose grid has it (its id does not hash
# the sweep's name), so a renamed sweep reuses it and the report lists a sweep's cells from here.
SWEEP_CELLS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata=_PK),  # "<sweep>:<cell>"
        pa.field("sweep", pa.string(), nullable=False),
        pa.field("cell", pa.string(), nullable=False),
        pa.field("system", pa.string()),
        pa.field("preset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),  # when a plan last listed it
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: SWEEP_CELLS.encode()},
)

# One row per evaluation cell being computed: how far it is, so a long sweep's progress can be read
# from the store by any process (`merg sweep --status`), and a resumed cell knows what was in flight.
CELL_PROGRESS_SCHEMA = pa.schema(
    [
        pa.field("cell", pa.string(), nullable=False, metadata=_PK),
        pa.field("system", pa.string()),
        pa.field("preset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("status", pa.string()),  # "running" | "interrupted" | "failed" | "scored" (every example stored)
        pa.field("total", pa.int32()),  # examples in the cell
        pa.field("done", pa.int32()),  # examples stored
        pa.field("reused", pa.int32()),  # examples already stored when this attempt started
        pa.field("chunk", pa.int32()),  # the chunk this attempt is computing (not yet stored)
        pa.field("chunks", pa.int32()),
        pa.field("redone", pa.int32()),  # chunks this attempt recomputes that an earlier attempt had in flight
        pa.field("attempt", pa.int32()),
        pa.field("seconds_per_example", pa.float64()),  # this attempt's pace, model loading excluded
        pa.field("pid", pa.int64()),
        pa.field("node", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("error", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),  # this attempt
        pa.field("created_at", pa.timestamp("us", tz="UTC")),  # this row's last update
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: CELL_PROGRESS.encode()},
)

# One row per emotion probe (`merg probe`): a classifier of MELD's emotion label from one feature of the
# store. Keyed like cells: `id` hashes everything that determines the numbers (the feature's content,
# labels, encoder, probe settings).
PROBE_RESULTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata=_PK),
        pa.field("feature", pa.string()),  # "text" or an embedding column
        pa.field("encoder", pa.string()),  # what made the feature (MiniLM, ImageBind checkpoint, fusion)
        pa.field("status", pa.string()),  # "done" | "skipped" (with the reason in `error`)
        pa.field("error", pa.string()),
        pa.field("sizes", pa.string()),  # JSON: train/dev/test examples
        pa.field("metrics", pa.string()),  # JSON: weighted-F1, accuracy (95% intervals), per-class F1, majority baseline, C
        pa.field("store_version", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: PROBE_RESULTS.encode()},
)

# Tables besides `utterances` that the store upserts generically: schema and merge key.
RECORD_TABLES: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    FAILURES: (FAILURES_SCHEMA, ("key", "stage")),
    TARGETS: (TARGETS_SCHEMA, ("id",)),
    EVAL_OUTPUTS: (EVAL_OUTPUTS_SCHEMA, ("id",)),
    EVAL_RESULTS: (EVAL_RESULTS_SCHEMA, ("cell",)),
    SWEEP_CELLS: (SWEEP_CELLS_SCHEMA, ("id",)),
    CELL_PROGRESS: (CELL_PROGRESS_SCHEMA, ("cell",)),
    PROBE_RESULTS: (PROBE_RESULTS_SCHEMA, ("id",)),
}


def target_id(kind: str, key: str) -> str:
    return f"{kind}:{key}"


def conform_records(name: str, rows: pa.Table | list[dict]) -> pa.Table:
    """Rows for a record table in its schema; absent nullable columns become nulls, created_at is stamped."""
    schema, _ = RECORD_TABLES[name]
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    if unknown := set(table.column_names) - set(schema.names):
        raise ValueError(f"columns not in the {name} schema: {', '.join(sorted(unknown))}")
    n = table.num_rows
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name == "created_at":
            columns.append(pa.array([np.datetime64("now", "us")] * n, pa.timestamp("us")).cast(field.type))
        elif not field.nullable:
            raise ValueError(f"{name} rows need a {field.name!r} column")
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class Rejection:
    key: str
    reason: str
    detail: str


def _row_nonfinite(column: pa.ChunkedArray) -> np.ndarray:
    """Per row: does a (variable or fixed size) float list contain NaN or inf? Nulls count as fine."""
    flags = []
    for chunk in column.chunks:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        # flatten() honours the slice offset and skips null rows (`.values` would return the whole
        # parent buffer of a sliced array, making every batch cost as much as the full table).
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(chunk), 0), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        bad = np.concatenate([[0], np.cumsum(~np.isfinite(values))])
        flags.append(bad[offsets[1:]] - bad[offsets[:-1]] > 0)
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def validate_utterances(
    table: pa.Table, embedding_dim: int, fused_dim: int | None = None
) -> tuple[pa.Table, list[Rejection]]:
    """Split a batch into rows fit for the store and rejections with a reason each.

    Checks: key format, known emotion and sentiment labels, embedding widths, finite values.
    Derives `emotion_id` / `sentiment_id` from the labels (callers never pass them), and keeps the
    last row of a key repeated within the batch.
    """
    fused_dim = fused_dim or embedding_dim
    schema = utterances_schema(embedding_dim, fused_dim)
    if unknown := set(table.column_names) - set(schema.names):
        raise ValueError(f"columns not in the utterances schema: {', '.join(sorted(unknown))}")
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    details: list[str] = [""] * n

    def reject(mask: np.ndarray, reason: str, detail_of) -> None:
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i], details[i] = reason, detail_of(i)

    names = table.column_names
    keys = table.column("key") if "key" in names else pa.chunked_array([pa.nulls(n, pa.string())])
    key_list = keys.to_pylist()
    bad_key = ~np.asarray(pc.fill_null(pc.match_substring_regex(keys, KEY_PATTERN), False))
    reject(bad_key, "bad_key", lambda i: f"key {key_list[i]!r} is not split/diaD_uttU")
    for column, vocab, reason in (("emotion", EMOTIONS, "unknown_emotion"), ("sentiment", SENTIMENTS, "unknown_sentiment")):
        values = table.column(column) if column in names else pa.chunked_array([pa.nulls(n, pa.string())])
        known = np.asarray(pc.fill_null(pc.is_in(values, pa.array(vocab)), False))
        labels = values.to_pylist()
        reject(~known, reason, lambda i, labels=labels, vocab=vocab: f"{labels[i]!r} not in {', '.join(vocab)}")
    for column in EMBEDDING_COLUMNS:
        if column not in names:
            continue
        width = fused_dim if column == "fused_emb" else embedding_dim
        emb = table.column(column)
        if pa.types.is_fixed_size_list(emb.type):
            lengths = np.where(np.asarray(emb.is_null()), width, emb.type.list_size)
        else:
            lengths = np.asarray(pc.fill_null(pc.list_value_length(emb), width))
        reject(lengths != width, "embedding_width", lambda i, c=column, l=lengths, w=width: f"{c} has {l[i]} values, the store holds {w}")
        if not (lengths != width).all():
            reject(_row_nonfinite(emb), "non_finite_embedding", lambda i, c=column: f"{c} contains NaN or inf")

    last_of_key = {k: i for i, k in enumerate(key_list)}
    keep = np.array([reasons[i] is None and last_of_key[key_list[i]] == i for i in range(n)], dtype=bool)
    rejections = [Rejection(str(key_list[i]), reasons[i], details[i]) for i in range(n) if reasons[i]]
    valid = table.filter(pa.array(keep))
    return _conform(valid, schema), rejections


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast to `schema`: derive label ids, fill absent columns with nulls, stamp created_at."""
    n = table.num_rows
    derived = {
        "emotion_id": pa.array([EMOTION_ID[e] for e in table.column("emotion").to_pylist()], pa.int32()),
        "sentiment_id": pa.array([SENTIMENT_ID[s] for s in table.column("sentiment").to_pylist()], pa.int32()),
    }
    columns = []
    for field in schema:
        if field.name in derived:
            columns.append(derived[field.name])
        elif field.name in table.column_names:
            column = table.column(field.name)
            if pa.types.is_fixed_size_list(column.type) and column.type != field.type:
                column = column.cast(pa.list_(pa.float32()))  # only nulls are left at a wrong width
            columns.append(column.cast(field.type))
        elif field.name == "created_at":
            columns.append(pa.array([np.datetime64("now", "us")] * n, pa.timestamp("us")).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
