"""The TIES threshold: the k-th largest magnitude of each task vector, over all its leaves."""
