"""Training the heads on cached CLIP features."""
