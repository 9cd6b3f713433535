"""The dataset contract shared by labeling and pretraining, and the dataset card generator."""
