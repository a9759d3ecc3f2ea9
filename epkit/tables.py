"""How epkit writes its per-request tables (``*.requests.parquet``), shared by ``epkit bench`` and the sweep's store
(which must not import pandas or the sweep package's runner: plain data only here)."""

# zstd: each request's chunk times dominate a table; ~25 % smaller than pandas' default snappy
REQUESTS_PARQUET = {"compression": "zstd", "compression_level": 9}
