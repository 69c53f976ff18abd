"""Data: manifests, DICOM images, clinical notes, and the samples and batches built from them."""
