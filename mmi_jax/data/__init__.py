"""Training data: the built-in shapes dataset, its tokenizer, packing into `Batch`es, grain.

`shapes` generates interleaved documents of simple pictures and captions, `tokenizer` is its
word-level tokenizer, `packing` turns documents into static-shape `mmi_jax.models.batch.Batch`es and
`pipeline` serves them through a checkpointable `grain.MapDataset`, sharded over processes.
"""
