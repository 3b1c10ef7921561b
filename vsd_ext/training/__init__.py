"""Draft training: objectives (eagle3, auf, vsd), their weights, data and the trainer."""
