"""Mask Transfiner, part 2: the learned refinement stage on top of Mask R-CNN's 28x28 masks.

Mask Transfiner (Ke et al., CVPR 2022, §3) refines only the incoherent regions:
1. an *incoherent-region detector* (a small FCN on the 28x28 RoI features and the coarse mask)
   marks the 28x28 cells to refine; they are the roots of a quadtree over 28 -> 56 -> 112;
2. a *node encoder* turns every quadtree node into a vector: the fine-grained RoI feature at
   the node's level, the coarse mask's value there, a sine encoding of the node's position in
   the RoI, and the 3x3 neighbourhood of features around it, fused by FC layers;
3. a *sequence encoder* (multi-head self-attention + feed-forward layers) lets the nodes of
   one RoI exchange information, across levels;
4. a *pixel decoder* (a 2-layer MLP) predicts each node's label, and ``transfiner.paste_refined``
   writes the labels back into the upsampled coarse mask, giving a 112x112 mask.
Losses: binary cross-entropy for the detector against the incoherent regions of the ground
truth at 28, and the paper's L1 between the refined node probabilities and the ground truth.

Dimensions: K RoIs; C_l feature channels at level l; S_l the level's grid side (28, 56, 112);
P nodes (all levels together); B attention sequences; L their padded length; D = d_model.

Public names (``TransfinerConfig`` lives in ``config``): ``IncoherentDetector``, ``gather_nodes``,
``gather_neighbourhood``, ``node_centres``, ``sine_position_encoding``, ``NodeEncoder``,
``node_sequences``, ``incoherent_loss``, ``refine_loss``, ``TransfinerRefiner``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import transfiner
from course_lib.config import TransfinerConfig


class IncoherentDetector(nn.Module):
    """Four 3x3 convs and a 1x1 binary classifier on [RoI features, coarse mask logit] at 28x28.

    ``forward(features: Tensor[K, C, S, S], coarse_mask_logits: Tensor[K, S, S]) -> Tensor[K, S, S]``
    logits that a cell is incoherent. Mask Transfiner §3 (the paper then upsamples this map
    and fuses it with finer levels; we predict at the coarsest level only and let the quadtree
    carry the roots down, as the released code does).
    """

    def __init__(self, in_channels: int, channels: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(in_channels + 1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, features: Tensor, coarse_mask_logits: Tensor) -> Tensor:
        x = torch.cat([features, coarse_mask_logits[:, None]], dim=1)  # [K, C+1, S, S]
        return self.classifier(self.convs(x))[:, 0]  # [K, S, S]


def gather_nodes(maps: Tensor, nodes: Tensor) -> Tensor:
    """Values of ``maps: Tensor[K, C, S, S]`` at ``nodes: Tensor[P, 3]`` (roi, y, x) -> ``Tensor[P, C]``."""
    return maps[nodes[:, 0], :, nodes[:, 1], nodes[:, 2]]  # [P, C]


def gather_neighbourhood(maps: Tensor, nodes: Tensor) -> Tensor:
    """The 3x3 neighbourhood of each node, zero-padded at the RoI border -> ``Tensor[P, 9C]``.

    Same numbers and order as ``F.unfold(maps, 3, padding=1)`` read at the nodes (channel-major,
    then the 3x3 window row by row), but computed only where there are nodes: unfolding the
    whole 112x112 map would hold 9 copies of it.
    """
    padded = F.pad(maps, (1, 1, 1, 1))  # [K, C, S+2, S+2]
    windows = [padded[nodes[:, 0], :, nodes[:, 1] + dy, nodes[:, 2] + dx]
               for dy in range(3) for dx in range(3)]  # 9 x [P, C]
    return torch.stack(windows, dim=-1).flatten(1)  # [P, C*9]


def node_centres(nodes: Tensor, size: int) -> Tensor:
    """Centres of the nodes' cells in RoI-relative coordinates in [0, 1]: ``Tensor[P, 2]`` as (x, y)."""
    return torch.stack([nodes[:, 2], nodes[:, 1]], dim=-1).float().add(0.5).div(size)


def sine_position_encoding(points: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Transformer-style sine/cosine encoding of 2-D points in [0, 1] -> ``Tensor[P, dim]``.

    Half of ``dim`` encodes x and half y, each as sin and cos at dim/4 frequencies spaced
    geometrically up to ``temperature`` (Vaswani et al. 2017; DETR's 2-D form, with the 2*pi
    scale so [0, 1] covers a full period at the lowest frequency). Nodes of all levels share
    it, so a node at 112 and its parent at 28 get nearby codes.
    """
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, device=points.device, dtype=torch.float32) / quarter)
    angles = 2 * math.pi * points[:, :, None] / freqs  # [P, 2, dim/4]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [P, dim]


class NodeEncoder(nn.Module):
    """Node vectors from fine feature, 3x3 context, coarse mask value, position and level.

    ``forward(features, coarse_probs, nodes_per_level) -> Tensor[P, D]``, the nodes of all
    levels concatenated in level order. Mask Transfiner §3. The paper
    describes the 3x3 neighbourhood context; its released code does not have it (it uses the
    feature at the node only). The learned level embedding is ours: it tells the encoder which
    grid a node lives on.
    """

    def __init__(self, in_channels: Sequence[int], d_model: int):
        super().__init__()
        # per level: [feature C, 3x3 context 9C, coarse mask 1] -> D
        self.inputs = nn.ModuleList(nn.Linear(10 * c + 1, d_model) for c in in_channels)
        self.level_embedding = nn.Embedding(len(in_channels), d_model)
        self.fuse = nn.Sequential(nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.d_model = d_model

    def forward(self, features: Sequence[Tensor], coarse_probs: Tensor,
                nodes_per_level: Sequence[Tensor]) -> Tensor:
        """``features`` per level ``Tensor[K, C_l, S_l, S_l]``, ``coarse_probs: Tensor[K, S_0, S_0]``,
        ``nodes_per_level`` per level ``Tensor[P_l, 3]`` -> ``Tensor[sum P_l, D]`` in level order."""
        vectors = []
        for level, (maps, nodes) in enumerate(zip(features, nodes_per_level)):
            size = maps.shape[-1]
            cue = F.interpolate(coarse_probs[:, None], size=(size, size), mode="bilinear", align_corners=False)
            x = torch.cat([gather_nodes(maps, nodes), gather_neighbourhood(maps, nodes),
                           gather_nodes(cue, nodes)], dim=1)  # [P_l, 10 C_l + 1]
            x = self.inputs[level](x) + sine_position_encoding(node_centres(nodes, size), self.d_model)
            vectors.append(x + self.level_embedding.weight[level])  # [P_l, D]
        return self.fuse(torch.cat(vectors))  # [P, D]


def node_sequences(roi_index: Tensor, max_len: int, generator: torch.Generator | None = None,
                   first_only: bool = False) -> tuple[Tensor, Tensor]:
    """Group nodes into attention sequences: one RoI's nodes, in random order, <= ``max_len`` each.

    Args:
        roi_index: ``Tensor[P]`` RoI of each node.
        max_len: longest sequence; a RoI with more nodes is split into several sequences.
        generator: randomness of the order (``None``: the global generator, seeded by
            ``utils.seed_everything``).
        first_only: keep one sequence per RoI (a random subset of its nodes): training.
    Returns:
        ``index: Tensor[B, L]`` int64 node indices (0 where padded) and
        ``padding: Tensor[B, L]`` bool, True at padded slots (``src_key_padding_mask``).

    Attention over all nodes of a RoI (21 per root) costs O(P^2); random groups keep it linear
    in P, each group still spanning the whole RoI and all levels. (The released code samples
    150 nodes per level in training.)
    """
    count = len(roi_index)
    perm = torch.randperm(count, generator=generator).to(roi_index.device)
    order = perm[torch.sort(roi_index[perm], stable=True).indices]  # grouped by RoI, random within
    rois = roi_index[order]
    counts = torch.bincount(rois)
    rank = torch.arange(count, device=rois.device) - (counts.cumsum(0) - counts)[rois]
    chunk, slot = rank // max_len, rank % max_len
    if first_only:
        order, rois, chunk, slot = order[chunk == 0], rois[chunk == 0], chunk[chunk == 0], slot[chunk == 0]
    seq = torch.unique(rois * (count + 1) + chunk, return_inverse=True)[1]  # [P'] sequence id
    length = int(slot.max()) + 1 if len(slot) else 0
    num_seq = int(seq.max()) + 1 if len(seq) else 0
    index = torch.zeros(num_seq, length, dtype=torch.int64, device=rois.device)
    padding = torch.ones(num_seq, length, dtype=torch.bool, device=rois.device)
    index[seq, slot] = order
    padding[seq, slot] = False
    return index, padding


def incoherent_loss(detector_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``Tensor[K, S, S]`` logits against bool incoherent regions."""
    if detector_logits.numel() == 0:
        return detector_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(detector_logits, targets.float())


def refine_loss(node_logits: Tensor, node_targets: Tensor, kind: str = "l1") -> Tensor:
    """Loss on refined node labels ``Tensor[P]`` against the ground truth in [0, 1].

    ``"l1"``: the paper's mean |sigmoid(logit) - ground truth|. Its gradient with respect to a
    logit is sigmoid'(logit) whatever the size of the error, so a node predicted confidently
    wrong barely moves, and a freshly initialised refiner can collapse to the majority label
    (background) and stay there. ``"bce"``: binary cross-entropy, whose gradient
    sigmoid(logit) - target grows with the error; the chapter compares the two.
    """
    if node_logits.numel() == 0:
        return node_logits.sum() * 0
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(node_logits, node_targets.float())
    return (node_logits.sigmoid() - node_targets.float()).abs().mean()


class TransfinerRefiner(nn.Module):
    """The whole refinement stage: detector, quadtree, node encoder, sequence encoder, pixel decoder.

    Args:
        config: ``TransfinerConfig``.
        in_channels: channels of the RoI features at each level (one int for all three, or
            one per level when the caller pools different maps, e.g. a fine stride-4 map at 112).

    ``forward(features, coarse_mask_logits, gt_masks=None)``:
        features: per level l, ``Tensor[K, C_l, S_l, S_l]`` RoI features, pooled by the caller
            with ``roi_ops.pool_rois`` at 28, 56 and 112.
        coarse_mask_logits: ``Tensor[K, 28, 28]`` mask logits of each RoI's class (ground-truth
            class in training, predicted class at inference). Detached here: the refinement
            losses train the refiner and the features, not the coarse mask head.
        gt_masks (training): per level ``Tensor[K, S_l, S_l]`` ground truth in [0, 1]
            (``mask_head.mask_targets`` at each resolution).
    Returns: in training ``{"loss_incoherent", "loss_refine"}``; at inference the refined
    ``Tensor[K, 112, 112]`` mask probabilities (``refine`` also returns the intermediate steps).
    """

    def __init__(self, config: TransfinerConfig, in_channels: int | Sequence[int]):
        super().__init__()
        channels = (in_channels,) * len(config.sizes) if isinstance(in_channels, int) else tuple(in_channels)
        if len(channels) != len(config.sizes):
            raise ValueError(f"in_channels={in_channels} needs one entry per level {config.sizes}")
        self.config = config
        self.detector = IncoherentDetector(channels[0], config.detector_channels)
        self.node_encoder = NodeEncoder(channels, config.d_model)
        layer = nn.TransformerEncoderLayer(config.d_model, config.num_heads, config.ffn_dim,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.sequence_encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.pixel_decoder = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.ReLU(),
                                           nn.Linear(config.d_model, 1))

    def forward(self, features: Sequence[Tensor], coarse_mask_logits: Tensor,
                gt_masks: Sequence[Tensor] | None = None) -> dict[str, Tensor] | Tensor:
        self._check_inputs(features, coarse_mask_logits, gt_masks)
        if self.training:
            return self.losses(features, coarse_mask_logits, gt_masks)
        return self.refine(features, coarse_mask_logits)["masks"]

    def incoherent_targets(self, gt_masks_28: Tensor) -> Tensor:
        """Detector targets ``Tensor[K, 28, 28]`` bool: incoherent regions of the ground truth at 28."""
        factor = self.config.incoherent_factor
        if self.config.incoherent_target == "soft":
            return transfiner.soft_incoherent_band(gt_masks_28, factor)
        return transfiner.incoherent_mask(gt_masks_28, factor)

    def node_logits(self, features: Sequence[Tensor], coarse_probs: Tensor, quadtree: transfiner.Quadtree,
                    generator: torch.Generator | None = None, first_only: bool = False) -> tuple[Tensor, Tensor]:
        """Group, encode, attend, decode: ``(logits Tensor[P], refined Tensor[P] bool)`` over all levels.

        ``refined`` marks the nodes that were in a sequence (all of them unless ``first_only``);
        the others get logit 0 and are never encoded, which keeps training cheap when the
        (untrained) detector marks half the RoI.
        """
        roi_index = torch.cat([nodes[:, 0] for nodes in quadtree.nodes])  # [P]
        index, padding = node_sequences(roi_index, self.config.max_nodes, generator, first_only)  # [B, L]
        refined = torch.zeros(len(roi_index), dtype=torch.bool, device=roi_index.device)
        refined[index[~padding]] = True
        chosen = refined.split(quadtree.num_nodes())
        tokens = self.node_encoder(features, coarse_probs, [n[c] for n, c in zip(quadtree.nodes, chosen)])
        logits = tokens.new_zeros(len(roi_index))
        if index.numel() == 0:
            return logits + tokens.sum() * 0, refined
        position = refined.long().cumsum(0) - 1  # node index -> row of tokens
        encoded = self.sequence_encoder(tokens[position[index]], src_key_padding_mask=padding)  # [B, L, D]
        decoded = self.pixel_decoder(encoded)[..., 0]  # [B, L]
        return logits.index_put((index[~padding],), decoded[~padding]), refined

    def losses(self, features: Sequence[Tensor], coarse_mask_logits: Tensor,
               gt_masks: Sequence[Tensor]) -> dict[str, Tensor]:
        """Training: detector BCE against the ground truth's incoherent regions, node-label loss.

        The quadtree's roots are the ground truth's incoherent cells plus the cells the
        detector currently predicts (detached): the refiner learns where it will be asked at
        inference, and the right places are covered from the first step.
        """
        coarse_logits = coarse_mask_logits.detach()
        detector_logits = self.detector(features[0], coarse_logits)  # [K, 28, 28]
        targets = self.incoherent_targets(gt_masks[0])  # [K, 28, 28] bool
        roots = targets | (detector_logits.detach().sigmoid() >= self.config.detector_thresh)
        tree = transfiner.build_quadtree(roots, len(self.config.sizes))
        logits, refined = self.node_logits(features, coarse_logits.sigmoid(), tree, first_only=True)
        labels = torch.cat([gather_nodes(gt[:, None].float(), nodes)[:, 0]
                            for gt, nodes in zip(gt_masks, tree.nodes)])  # [P]
        return {"loss_incoherent": incoherent_loss(detector_logits, targets),
                "loss_refine": refine_loss(logits[refined], labels[refined], self.config.node_loss)}

    @torch.no_grad()
    def refine(self, features: Sequence[Tensor], coarse_mask_logits: Tensor) -> dict:
        """Inference with its intermediate steps, for the chapter's pictures.

        Returns ``{"masks": Tensor[K, 112, 112], "incoherent_probs": Tensor[K, 28, 28],
        "quadtree": Quadtree, "node_probs": list of Tensor[P_l]}``.
        """
        coarse_probs = coarse_mask_logits.sigmoid()  # [K, 28, 28]
        incoherent_probs = self.detector(features[0], coarse_mask_logits).sigmoid()  # [K, 28, 28]
        tree = transfiner.build_quadtree(self.select_roots(incoherent_probs), len(self.config.sizes))
        generator = torch.Generator().manual_seed(self.config.seed)
        logits, _ = self.node_logits(features, coarse_probs, tree, generator)
        node_probs = list(logits.sigmoid().split(tree.num_nodes()))
        masks = transfiner.paste_refined(coarse_probs, node_probs, tree)  # [K, 112, 112]
        return {"masks": masks, "incoherent_probs": incoherent_probs, "quadtree": tree,
                "node_probs": node_probs}

    def select_roots(self, incoherent_probs: Tensor) -> Tensor:
        """Roots ``Tensor[K, S, S]`` bool: probability >= ``detector_thresh``, at most ``max_roots`` per RoI.

        The cap bounds inference cost (21 nodes per root) when the detector is unsure, e.g.
        early in training; a trained detector rarely reaches it.
        """
        flat = incoherent_probs.flatten(1)  # [K, S*S]
        k = min(self.config.max_roots, flat.shape[1])
        kth = flat.topk(k, dim=1).values[:, -1:] if len(flat) else flat[:, :1]  # [K, 1]
        return (incoherent_probs >= self.config.detector_thresh) & (incoherent_probs >= kth[:, :, None])

    def _check_inputs(self, features, coarse_mask_logits, gt_masks) -> None:
        sizes = self.config.sizes
        if len(features) != len(sizes):
            raise ValueError(f"features has {len(features)} levels; expected {len(sizes)} for sizes {sizes}")
        num_rois = coarse_mask_logits.shape[0]
        if tuple(coarse_mask_logits.shape) != (num_rois, sizes[0], sizes[0]):
            raise ValueError(f"coarse_mask_logits must be [K, {sizes[0]}, {sizes[0]}]; "
                             f"got {tuple(coarse_mask_logits.shape)}")
        for level, (maps, size) in enumerate(zip(features, sizes)):
            if maps.dim() != 4 or maps.shape[0] != num_rois or tuple(maps.shape[-2:]) != (size, size):
                raise ValueError(f"features[{level}] must be [{num_rois}, C, {size}, {size}]; "
                                 f"got {tuple(maps.shape)}")
        if self.training and (gt_masks is None or len(gt_masks) != len(sizes)):
            raise ValueError(f"training needs gt_masks, one [K, S, S] per level {sizes}; "
                             f"got {type(gt_masks).__name__}")
        for level, gt in enumerate(gt_masks if self.training else ()):
            if tuple(gt.shape) != (num_rois, sizes[level], sizes[level]):
                raise ValueError(f"gt_masks[{level}] must be [{num_rois}, {sizes[level]}, {sizes[level]}]; "
                                 f"got {tuple(gt.shape)}")
