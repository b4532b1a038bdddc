"""OUTPUT as the annotate job keeps it: the writer, the run state, the ledger of completion records, the lease."""
