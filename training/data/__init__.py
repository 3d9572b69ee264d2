"""Training data: image folders, buckets, captions and their trigger/tag rules, caption files, captioners."""
