"""The note catalog: reading and checking it (`notes.py`), the openclipart import, synthetic catalogs for tests and demos."""
