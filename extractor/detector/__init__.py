"""The bottom-up-attention detector: config, network, weights, box selection, training and mAP."""
