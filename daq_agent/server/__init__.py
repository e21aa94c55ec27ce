"""The embedded local ingestion server: a Sift-compatible gRPC API stored in one SQLite file."""
