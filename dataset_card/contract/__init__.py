"""The contract between labeling and pretraining: columns and features (`schema`), codecs, painting
rules and their invariants, the output folder's layout, the shard commit protocol, the one-writer
lease, and how a labels-only release finds its images again."""
