"""Sample quality against held-out data: distances for vectors, feature-space metrics for images."""
from diffusion_irl.metrics.features import FeatureClassifier, image_metrics, inception_fid, train_feature_classifier
from diffusion_irl.metrics.fid import FrechetStats, InceptionFeatures, ReferenceFeatures, frechet_distance, reference_features
from diffusion_irl.metrics.samples import (
    exact_w2,
    gmm_nll,
    hq_fraction,
    mmd,
    mode_coverage,
    prdc_metrics,
    sample_metrics,
    sliced_w2,
)

__all__ = [
    "FeatureClassifier",
    "FrechetStats",
    "InceptionFeatures",
    "ReferenceFeatures",
    "exact_w2",
    "frechet_distance",
    "gmm_nll",
    "hq_fraction",
    "image_metrics",
    "inception_fid",
    "mmd",
    "mode_coverage",
    "prdc_metrics",
    "reference_features",
    "sample_metrics",
    "sliced_w2",
    "train_feature_classifier",
]
