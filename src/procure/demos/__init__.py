"""The demos: whole stories on local mock services, one process each."""
