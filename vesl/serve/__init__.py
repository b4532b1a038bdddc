"""`vesl serve`: the annotate stages as an online service on Ray Serve (one request, one row)."""
