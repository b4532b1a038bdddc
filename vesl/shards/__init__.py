"""Reading what annotate wrote: region-text shards as DataFrames and back, `vesl inspect`, the HTML report."""
