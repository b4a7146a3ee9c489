"""Vast.ai: the API client (`client.VastCloud`), its wire format, and the mock Vast.ai cloud
(`mock.start_mock_cloud`, `mock.serve_mock_cloud`) with bids, outbids and per-second billing."""
