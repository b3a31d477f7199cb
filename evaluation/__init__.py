"""Sample-quality evaluation, one module per concern (import what you use from the submodule):

    metrics       FID, KID, the Inception Score formula, uint8 quantisation, sample-size caveats
    inception     the FID Inception-v3 network, its weights file and preprocessing
    classifiers   a domain classifier for small grayscale data, its training loop and files
    digits        the digits MLP classifier and the quality figures of (colored) digit samples
    features      streaming image batches through a feature extractor; FID/KID of samples vs reference stats
    reference     reference statistics files (``--mode=fid_stats``)
    sample_files  samples made elsewhere (``--mode=eval_samples``), read safely
    quality       each data source's quality figure, label classifier and palette

The modes that use them (``fid_stats``, ``eval_samples``) are runners in ``run_lib``.
"""
from evaluation import classifiers, digits, features, inception, metrics, quality, reference, sample_files  # noqa: F401
