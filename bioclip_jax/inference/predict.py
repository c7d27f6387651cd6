"""pybioclip's `bioclip.predict` module under one name: its classes, module functions and constants, so code written
for pybioclip changes its import line only (`from bioclip.predict import X` -> `from bioclip_jax.inference.predict
import X`). The implementations live in classify.py and tree_of_life.py; docs/pybioclip.md lists every name and how it
compares (features and probabilities are numpy arrays where pybioclip returns torch tensors).
"""

from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.inference.classify import (
    BIOCLIP_MODEL_STR,
                                            BIOCLIP_V1_MODEL_STR,
                                            BIOCLIP_V2_MODEL_STR,
    DEFAULT_BATCH_SIZE,
    HF_DATAFILE_REPO_TYPE,
    PRED_CLASSICATION_KEY,
    PRED_FILENAME_KEY,
    PRED_SCORE_KEY,
    TOL_MODELS,
    BaseClassifier,
    CustomLabelsBinningClassifier,
    CustomLabelsClassifier,
    create_bioclip_tokenizer,
    ensure_tol_supported_model,
    get_tol_repo_id,
    predict_classifications_from_list,
)
from bioclip_jax.inference.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.tree_of_life import (
    COMMON_NAME_LABEL,
    SPECIES_EPITHET_LABEL,
    SPECIES_LABEL,
    Rank,
    TreeOfLifeClassifier,
    create_classification_dict,
    get_rank_labels,
    get_tol_classification_labels,
    join_names,
    predict_classification,
)

# pybioclip's spelling; each entry maps a class name to one prompt, as pybioclip's lambdas do.
OPENA_AI_IMAGENET_TEMPLATE = [lambda c, template=template: template.format(c) for template in OPENAI_IMAGENET_TEMPLATES]

# pybioclip's fixed transform for its BioCLIP models: squash to 224 x 224 (antialiased bilinear), OpenAI mean/std.
# It returns [224, 224, 3] float32 (channels last, as JAX takes images) where torchvision returns [3, 224, 224].
preprocess_img = Preprocess(size=224).pybioclip_squash()

__all__ = ["BIOCLIP_MODEL_STR", "BIOCLIP_V1_MODEL_STR", "BIOCLIP_V2_MODEL_STR", "COMMON_NAME_LABEL",
           "DEFAULT_BATCH_SIZE", "HF_DATAFILE_REPO_TYPE", "OPENA_AI_IMAGENET_TEMPLATE", "PRED_CLASSICATION_KEY",
           "PRED_FILENAME_KEY", "PRED_SCORE_KEY", "SPECIES_EPITHET_LABEL", "SPECIES_LABEL", "TOL_MODELS",
           "BaseClassifier", "CustomLabelsBinningClassifier", "CustomLabelsClassifier", "Rank", "TreeOfLifeClassifier",
           "create_bioclip_tokenizer", "create_classification_dict", "ensure_tol_supported_model", "get_rank_labels",
           "get_tol_classification_labels", "get_tol_repo_id", "join_names", "predict_classification",
           "predict_classifications_from_list", "preprocess_img"]
