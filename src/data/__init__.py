"""Image inputs: image folders, the synthetic captioned scenes, bundled photos and the committed sample set."""
