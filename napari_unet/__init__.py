"""napari-unet: human-in-the-loop brain-tumour segmentation in napari.

Nothing here imports torch or Qt: napari imports this package at start-up.
"""

__version__ = "0.1.0"


class NapariUnetError(Exception):
    """A problem the user can fix; the message names the file and the problem."""
