"""The ingestion API, shaped like Sift's Python client (``sift_py.ingestion``)."""
