"""The annotate job: plan the input into work units, run the stages on Ray Data, commit shards to OUTPUT."""
