"""`notellm2 data ...` verbs: one module per sub-verb, named like it (`data mine-pairs` -> `mine_pairs.py`)."""
