"""The evaluation room: embedding at catalog scale, Recall@K and its protocols, search (exact, faiss), reports and plots, the attention analysis."""
