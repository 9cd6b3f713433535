"""The Ray pipeline: an input list -> read, model and post-process stages -> committed shards.

`driver` plans and runs it (`config` is what a run is asked to do, `dataflow` the Ray Data graph);
`preprocess`, `predictors` and `postprocess` are its stages; `writer` gathers rows per shard and
commits them; `manifest` decides whether a rerun may resume; `finish` writes stats.json and the
closing line; `failures` names why an input failed; `cluster` joins or starts Ray.
"""
