"""Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field (Zhou et al., CVPR 2024).

Parts: ``scene`` (COLMAP / transforms.json loaders), ``synthetic`` (embedded scene generator), ``teacher`` (MaskCLIP
dense features, fp16 cache), ``model`` (Gaussians + 1x1 decoder), ``losses``, ``distiller`` (the training task),
``query`` (text queries, editing), ``evaluate``, ``render``, ``export``, ``commands`` (CLI entry points).
"""
