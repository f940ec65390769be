"""Small models for tests, samples and examples (importable by ``--arch``)."""
