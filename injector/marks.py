"""The project's own DID metadata on files (Rucio's JSON metadata plugin): one place for the keys.

PATH, DATASET, STREAM are written by ingest with the replica. ARCHIVED_AT is the archive time decided
once (by cleanup on deletion-done, or by the reconciler) so every file-archived for a file is
byte-identical; ANNOUNCED says the file-archived was published (reconciler: set after the broker confirmed) or
is owed by an unacked deletion-done (cleanup: set before it emits); RELEASED_AT is when a source was released.
FINISHED is on datasets, not files: the number of files a dataset held when the reconciler found every one
finished (operations.inventory), so later sweeps skip it; UNATTACHED, also on datasets, names the files recorded
for it that a sweep found registered but not attached, so later sweeps look at them whatever their age.
TRANSFER_FAILURES holds the file's current transfer-failure episode per destination (consumers.transfer_failures).
"""

PATH = "injector_path"
DATASET = "injector_dataset"
STREAM = "injector_stream"
RELEASED_AT = "injector_released_at"
ARCHIVED_AT = "injector_archived_at"
ANNOUNCED = "injector_announced"
TRANSFER_FAILURES = "injector_transfer_failures"
FINISHED = "injector_finished"
UNATTACHED = "injector_unattached"
