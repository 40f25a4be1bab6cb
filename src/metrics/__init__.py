"""Pure metric functions (similarity, k-NN overlap, spectra, bootstrap intervals) on arrays and tensors."""
