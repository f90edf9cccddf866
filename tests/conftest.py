import os

# Nothing in the test suite may reach the Hub: fail fast instead of retrying a connection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
