"""Learn: the networks, encoder training, embedding and HOG features."""
