"""Feature drafters (EAGLE-like): a one-layer head that drafts from the target's own hidden states.

The target's last hidden state f_j (the vector its output layer turns into the
logits for token j + 1) carries most of what the next tokens will be. The head
reads pairs (f_j, embedding of x_{j+1}), runs one decoder layer with its own KV
cache, and predicts f_{j+1}; the target's output rows for a reduced vocabulary
turn that into a draft of x_{j+2}. Further drafts feed the head's own predicted
feature with the drafted token (Li et al., EAGLE, 2024).

Only the head is trained and stored (`training.distill`, `--init feature`): the
token embeddings and output rows are the target's, so a feature drafter loads
against the target it was distilled from and shares its tokenizer by construction.

Per request, the engine keeps the target's hidden states of the verified tokens
(`TargetFeatures`, one row per verified token but the pending last one); the
session feeds each true pair once into the head's cache and rolls back the
speculative entries of a draft, so rejected drafts cost nothing to undo.
"""
from draftpick.workers.drafters.feature.drafter import FeatureDrafter, FeatureSession, TargetFeatures, head_dtype
from draftpick.workers.drafters.feature.head import FeatureHead, body_config, target_fingerprint
from draftpick.workers.drafters.feature.storage import HEAD_FILE, WEIGHTS, is_feature_drafter, load_head, save_head

__all__ = ["FeatureDrafter", "FeatureSession", "TargetFeatures", "head_dtype", "FeatureHead", "body_config",
           "target_fingerprint", "HEAD_FILE", "WEIGHTS", "is_feature_drafter", "load_head", "save_head"]
