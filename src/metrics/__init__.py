"""Pure metrics over arrays: neighbourhoods and overlap, representation similarity, spectra, bootstrap intervals."""
