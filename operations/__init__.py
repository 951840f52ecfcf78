"""Operator tools: reconcile (finish from Rucio's state what lost events left undone), status (where every file
is), dlq (list, export, purge, replay and migrate dead letters), with what they read and report (inventory,
findings, orphans). They use the consumers' own decisions (`consumers.cleanup.verify`, `consumers.announcement`)
and are never used by them: operations → consumers → injector."""
