"""The acquisition pipeline: ring buffer, flusher, spool and the agent that owns the threads."""
