"""Stages 6-8: reconstructor evaluation, captions from stored / reconstructed / perturbed E_post, and their scores."""
