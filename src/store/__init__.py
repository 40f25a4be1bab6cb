"""The versioned vector store: chunked writes, manifests, verification and locking."""
