"""Vector stores: writing, verifying and reading shards (samples, batches, split, stats); recon runs."""
