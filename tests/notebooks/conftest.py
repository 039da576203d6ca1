"""The radiomics notebook's lake (``features_lake``) is a session fixture of tests/conftest.py,
shared with the cohort feature tests."""
