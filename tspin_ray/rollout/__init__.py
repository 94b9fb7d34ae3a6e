"""What generation produces and how it is kept: phases and prompt rows, seeds, Parquet shards of triplets."""
