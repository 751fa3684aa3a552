"""The data layer: every format (study PNG slices and the demo set, MVTec AD folders, NIfTI
volumes, plain image files for ``predict``) through one preprocessing path into one kind of
data set. See docs/architecture.md for the layers.
"""

from .load import SPLITS, load_data
from .preprocess import IMAGE_SUFFIXES, NIFTI_SUFFIXES, prepare
from .sets import NORMAL, DataBundle, ImageSet, Item, Loader, counted, files_read, fingerprint

__all__ = ["SPLITS", "load_data", "IMAGE_SUFFIXES", "NIFTI_SUFFIXES", "prepare", "NORMAL", "DataBundle",
           "ImageSet", "Item", "Loader", "counted", "files_read", "fingerprint"]
