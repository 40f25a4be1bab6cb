"""Image sets: synthetic scenes, photo folders, the committed sample, and image-file helpers."""
