"""The control queue: ingest, slot bookkeeping between the stages, and the report."""
