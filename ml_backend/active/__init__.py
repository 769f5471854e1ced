"""Active-learning query strategies (pure: numpy, modAL, faiss)."""
