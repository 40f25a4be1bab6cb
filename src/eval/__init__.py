"""Stages 6-8: reconstruction metrics, captions from injected E_post, perturbations and caption scoring."""
