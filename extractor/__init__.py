"""Visual Genome Faster R-CNN (bottom-up attention) on torchvision, and the HDF5 feature store."""
