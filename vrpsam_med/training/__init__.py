"""Episodes, meta-training and fine-tuning of the VRP encoder."""
