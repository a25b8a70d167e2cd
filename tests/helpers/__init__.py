"""What the tests share: where the repository is, tiny configs, runs' metrics, loaders, the tiny
models, data builders and the multi-rank harness.

    paths.py    REPO (computed here, once), repo_path("configs/tiny_cpu.yaml"), TINY_CPU
    configs.py  tiny_config({...}) / write_tiny_config(path, {...}): configs/tiny_cpu.yaml + dotted overrides
    runs.py     read_metrics(run_dir): the one parser of a run's metrics.jsonl; metrics_by_step(run_dir)
    loaders.py  pair_loader(shards, ...): the one PairLoader builder of the reader tests
"""
