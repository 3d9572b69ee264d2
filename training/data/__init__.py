"""Training data: ``images`` (records, listing, decoding), ``buckets`` (aspect buckets, pixels, the batch
sampler), ``captions`` (the only tag and trigger rules), ``dataset`` (scanning a folder, the dataset,
provenance), ``caption_files`` (writing and editing captions), ``captioners`` with ``blip`` and ``wd14``."""
