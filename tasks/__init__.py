"""Tasks: the differentiable targets of each task and their evaluation checks.

- :mod:`mmexplain.tasks.caption` — caption log-probability and per-word targets;
- :mod:`mmexplain.tasks.vqa` — answer scores, also for answers the model did not give;
- :mod:`mmexplain.tasks.video` — action logits with spatiotemporal (and per-slice) maps;
- :mod:`mmexplain.tasks.classify` — class logits of image classifiers;
- :mod:`mmexplain.tasks.shapes` — accuracy checks of the shipped shapes-world models.
"""

from mmexplain.tasks.caption import CaptionLogProb, WordLogProbs, caption_words, explain_caption
from mmexplain.tasks.classify import class_target, explain_image
from mmexplain.tasks.video import (TemporalGradCAM, TemporalGradCAMPlusPlus, action_target,
                                   explain_clip)
from mmexplain.tasks.vqa import AnswerScore, explain_vqa

__all__ = ["AnswerScore", "CaptionLogProb", "TemporalGradCAM", "TemporalGradCAMPlusPlus",
           "WordLogProbs", "action_target", "caption_words", "class_target", "explain_caption",
           "explain_clip", "explain_image", "explain_vqa"]
