"""Lambda Cloud (API v1): the client (`client.py`) and a local mock that speaks the same API
(`mock.py`), whose instances run simulated GPU nodes. `lambda` is a keyword, hence the name."""
