"""The HTTP API: the seeds' agent endpoints, resource routes, /metrics and /healthz."""
