"""Where checkpoints live: file formats, atomic local files and the manifest."""
