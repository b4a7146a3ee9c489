"""The gateway: sells a cloud account's GPUs over the seeds' x402 vendor protocol (quotes from live
offers plus a margin, paid jobs run on launched instances through the node's job runner)."""
