"""Payments: x402 client, facilitator and the local settlement chain."""
