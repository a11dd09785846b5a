"""asv benchmark suite (asv.conf.json's benchmark_dir): the performance history of every implementation."""
