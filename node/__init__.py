"""enhance-node: a DICOM node that enhances low-dose and fast scans."""

__version__ = "0.1.0"
