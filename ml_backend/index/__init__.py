"""Nearest-neighbour search over scan embeddings (FAISS), keyed by Scan primary keys."""
