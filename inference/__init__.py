"""Stage 9: prediction on new studies for clinicians.

``predict.py`` reads a DICOM folder with the same discovery and validation as training, runs a model bundle with
the bundle's recorded preprocessing and writes one folder per study; ``explain.py`` makes Grad-CAM heat maps on
the original CT grid and renders key-slice overlays; ``report.py`` writes a self-contained HTML report.
"""
