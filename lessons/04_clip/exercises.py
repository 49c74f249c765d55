"""Lesson 04 exercise: CLIP's symmetric contrastive loss.

Fill in the region between `# TODO begin` and `# TODO end`, then grade it:

    python lessons/04_clip/grade.py

lesson.py uses your function as soon as it no longer raises NotImplementedError.
"""
import torch
import torch.nn.functional as F  # noqa: F401  (F.normalize and F.cross_entropy are all you need)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """The symmetric cross-entropy that trains CLIP, averaged over the batch.

    Input:
        image_emb    [B, D] float: image i's embedding (NOT normalised yet)
        text_emb     [B, D] float: caption i's embedding (NOT normalised yet); pair i = (image i, caption i)
        logit_scale  scalar (float or 0-d tensor) s: a LOG scale; the logits are multiplied by exp(s) = 1 / tau
    Output:
        a 0-d tensor: (L_img->txt + L_txt->img) / 2, where
            logits_ij   = exp(s) * cos(image_i, caption_j)                         [B, B]
            L_img->txt  = mean_i of -log softmax over j of logits_ij, at j = i      (each image picks its caption)
            L_txt->img  = mean_j of -log softmax over i of logits_ij, at i = j      (each caption picks its image)
    Gradients must flow to both embeddings, and to logit_scale when it is a tensor (CLIP learns its temperature).
    """
    # TODO begin
    raise NotImplementedError
    # TODO end
