"""Cache-stage methods, one file each (auto-imported by ``tokenreduce.methods``, so each registers itself)."""
